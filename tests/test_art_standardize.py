"""The `standardize` input transform against docs/design.md#what-the-memory-sees written out in float64 numpy: the
fit, what the rule sees, the novelty, the floor for constant dimensions, and the `input_dim_scale` tensor of ART file
format 4 (versions 2 and 3 still load; a damaged scale is refused). Two processes' fit: test_art_distributed.py."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save
from test_art_memory import older_tensors, rewrite

from modeling_gptb import art_memory, configuration_gptb
from modeling_gptb.art_file import ART_FORMAT_VERSION, load_art_file
from modeling_gptb.art_memory import DIM_SCALE_FLOOR, ARTMemory

LIFT = 2.5


def rows(n, dim=5, seed=0):
    """Rows whose dimensions have very different spreads (0.1 to 10), as pooled hidden states do."""
    generator = np.random.default_rng(seed)
    return generator.standard_normal((n, dim)) * np.logspace(-1, 1, dim) + np.arange(dim)


def reference_fit(x):
    """c, sigma and s from the definition: the mean row; the population standard deviation of each dimension,
    floored at DIM_SCALE_FLOOR times sqrt(mean_d sigma_d^2); the RMS norm of z = (x - c) / sigma."""
    c = x.mean(axis=0)
    sigma = np.sqrt(((x - c) ** 2).mean(axis=0))
    sigma = np.maximum(sigma, 1e-3 * np.sqrt((sigma**2).mean()))
    z = (x - c) / sigma
    s = np.sqrt((z**2).sum(axis=1).mean())
    return c, sigma, s


def reference_seen(x, fit, lift=LIFT):
    """What the rule sees: [z / s, lift]."""
    c, sigma, s = fit
    return np.concatenate([(x - c) / sigma / s, np.full((x.shape[0], 1), lift)], axis=1)


def fitted(x, **kwargs):
    memory = ARTMemory(x.shape[1], input_transform="standardize", lift=LIFT, dtype=torch.float64, **kwargs)
    return memory.fit_input_transform(torch.from_numpy(x))


def test_the_fit_and_what_the_rule_sees_are_the_definition():
    x, test = rows(60), rows(15, seed=1)
    memory = fitted(x)
    c, sigma, s = reference_fit(x)
    np.testing.assert_allclose(memory.input_center.numpy(), c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(memory.input_dim_scale.numpy(), sigma, rtol=1e-12)
    assert float(memory.input_scale) == pytest.approx(s, rel=1e-12)
    seen = memory._check_x(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(seen, reference_seen(test, (c, sigma, s)), rtol=1e-12, atol=1e-12)
    # the fitted rows' z / s have RMS norm 1, and no dimension dominates: each has unit variance before / s
    fitted_seen = memory._check_x(torch.from_numpy(x)).numpy()[:, :-1]
    assert np.sqrt((fitted_seen**2).sum(1).mean()) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(fitted_seen.std(axis=0) * s, np.ones(5), rtol=1e-12)
    assert memory.rule_dim == memory.stored_dim == 6


def test_the_novelty_is_one_minus_the_cosine_to_prototypes_computed_by_hand():
    """Two rows create categories; a third, close to the first, resonates and moves that prototype halfway to it."""
    x = rows(40, seed=2)
    memory = fitted(x, vigilance=0.999)
    fit = reference_fit(x)
    learned = np.stack([x[0], x[1], x[0] + 0.01 * fit[1]])  # the third: 0.01 standard deviations from the first
    out = memory.update(torch.from_numpy(learned))
    assert out.status_names() == ["new", "new", "resonated"] and out.category.tolist() == [0, 1, 0]
    a, b, a2 = reference_seen(learned, fit)
    prototypes = np.stack([0.5 * a + 0.5 * a2, b])  # beta = 0.5: w <- (1 - beta) w + beta i
    np.testing.assert_allclose(memory.prototypes.numpy(), prototypes, rtol=1e-12, atol=1e-12)
    test = rows(8, seed=3)
    seen = reference_seen(test, fit)
    cosine = (seen @ prototypes.T) / np.outer(np.linalg.norm(seen, axis=1), np.linalg.norm(prototypes, axis=1))
    np.testing.assert_allclose(memory.novelty(torch.from_numpy(test)).numpy(), 1 - cosine.max(1), atol=1e-12)


def test_a_constant_dimension_is_divided_by_the_floor():
    """sigma_d below 1e-3 x the RMS of sigma (here exactly 0, and 1e-9) is replaced by that floor: no division by
    zero, and a dimension that barely varies is not blown up to the others' size."""
    x = rows(30, seed=4)
    x[:, 1] = 7.0
    x[:, 3] = 2.0 + 1e-9 * np.random.default_rng(5).standard_normal(30)
    memory = fitted(x)
    sigma = np.sqrt(((x - x.mean(0)) ** 2).mean(0))
    floor = DIM_SCALE_FLOOR * np.sqrt((sigma**2).mean())
    assert DIM_SCALE_FLOOR == 1e-3 and floor > 0
    scale = memory.input_dim_scale.numpy()
    assert scale[1] == pytest.approx(floor, rel=1e-12) and scale[3] == pytest.approx(floor, rel=1e-12)
    np.testing.assert_allclose(scale[[0, 2, 4]], sigma[[0, 2, 4]], rtol=1e-12)
    seen = memory._check_x(torch.from_numpy(x)).numpy()
    assert np.isfinite(seen).all() and (seen[:, 1] == 0).all() and np.abs(seen[:, 3]).max() < 1e-3
    np.testing.assert_allclose(seen, reference_seen(x, reference_fit(x)), rtol=1e-12, atol=1e-12)


def test_a_standardized_memory_is_the_plain_memory_on_standardized_rows():
    x, test = rows(80, seed=6), rows(20, seed=7)
    memory = fitted(x, vigilance=0.97)
    fit = reference_fit(x)
    plain = ARTMemory(6, vigilance=0.97, dtype=torch.float64)
    out, expected = memory.update(torch.from_numpy(x)), plain.update(torch.from_numpy(reference_seen(x, fit)))
    assert torch.equal(out.category, expected.category) and torch.equal(out.status, expected.status)
    assert memory.num_categories > 3
    novelty = memory.novelty(torch.from_numpy(test))
    torch.testing.assert_close(novelty, plain.novelty(torch.from_numpy(reference_seen(test, fit))), rtol=0, atol=1e-12)


def test_standardize_is_fitted_like_the_other_transforms():
    """Needs the cosine rule; refuses to run unfitted; fitting resets the memory; `reset` keeps the fit; other
    transforms keep a per-dimension scale of ones."""
    with pytest.raises(ValueError, match="needs rule='cosine'"):
        ARTMemory(4, rule="fuzzy", input_transform="standardize")
    memory = ARTMemory(5, input_transform="standardize", dtype=torch.float64)
    with pytest.raises(ValueError, match="input_transform='standardize' is not fitted: call fit_input_transform"):
        memory.classify(torch.ones(2, 5))
    with pytest.raises(ValueError, match="every row is the same"):
        memory.fit_input_transform(torch.ones(3, 5))
    assert not memory.input_fitted and torch.equal(memory.input_dim_scale, torch.ones(5, dtype=torch.float64))
    x = torch.from_numpy(rows(30, seed=8))
    memory.fit_input_transform(x).update(x)
    fit = memory.input_dim_scale.clone()
    memory.fit_input_transform(x * 2)
    assert memory.num_categories == 0 and torch.allclose(memory.input_dim_scale, 2 * fit, rtol=1e-12)
    memory.update(x)
    memory.reset()
    assert memory.num_categories == 0 and memory.input_fitted
    euclidean = ARTMemory(5, input_transform="euclidean", dtype=torch.float64).fit_input_transform(x)
    assert torch.equal(euclidean.input_dim_scale, torch.ones(5, dtype=torch.float64))


def test_every_list_of_transforms_has_standardize():
    from gptb_cli import build_parser

    assert configuration_gptb.ART_INPUT_TRANSFORMS == art_memory.ART_INPUT_TRANSFORMS
    assert "standardize" in art_memory.ART_INPUT_TRANSFORMS
    (report,) = [a for a in build_parser()._actions if a.dest == "command"]
    (transform,) = [a for a in report.choices["art-report"]._actions if a.dest == "input_transform"]
    assert tuple(transform.choices) == art_memory.ART_INPUT_TRANSFORMS
    config = configuration_gptb.GPTBConfig(n_embd=8, n_layer=1, n_head=2, art_input_transform="standardize")
    assert configuration_gptb.art_rule_dim(config.n_embd, config.art_input_transform) == 9
    with pytest.raises(ValueError, match="needs art_rule='cosine'"):
        configuration_gptb.GPTBConfig(art_input_transform="standardize", art_rule="fuzzy")


# ---------------------------------------------------------------------------------------------------------------------
# The file


def saved(tmp_path, transform="standardize"):
    x = rows(50, seed=9)
    x[:, 2] = 1.0  # a floored dimension
    memory = ARTMemory(5, vigilance=0.9, input_transform=transform, lift=LIFT, dtype=torch.float64)
    memory.fit_input_transform(torch.from_numpy(x))
    memory.update(torch.from_numpy(x), exemplars=torch.arange(50)[:, None])
    memory.calibrate(torch.from_numpy(rows(30, seed=10)), fpr=0.1)
    return memory, memory.save_pretrained(tmp_path)


def assert_same_state(memory, loaded):
    k = memory.num_categories
    assert loaded.num_categories == k and loaded.input_transform == memory.input_transform
    other = dict(loaded.named_buffers())
    for name, tensor in memory.named_buffers():
        if tensor.shape[:1] == (memory.max_categories,):
            tensor, mine = tensor[:k], other[name][:k]
        else:
            mine = other[name]
        assert tensor.dtype == mine.dtype and torch.equal(tensor, mine), name


def test_the_dim_scale_travels_in_the_file_bit_exactly(tmp_path):
    memory, path = saved(tmp_path)
    config, tensors = load_art_file(path)
    assert ART_FORMAT_VERSION >= 4 and config["input_transform"] == "standardize"
    assert torch.equal(tensors["input_dim_scale"], memory.input_dim_scale)
    assert_same_state(memory, ARTMemory.from_pretrained(tmp_path))
    into = ARTMemory(5, vigilance=0.9, input_transform="standardize", lift=LIFT, dtype=torch.float64)
    assert_same_state(memory, into.load_file(path))
    test = torch.from_numpy(rows(10, seed=11))
    assert torch.equal(into.novelty(test), memory.novelty(test))
    # like the center and scale, the dim scale lives in the ART file, not the state_dict (old folders keep loading)
    assert "input_dim_scale" not in memory.state_dict() and "input_dim_scale" in dict(memory.named_buffers())
    with pytest.raises(ValueError, match="input_transform is 'standardize' in the file but 'euclidean' here"):
        ARTMemory(5, vigilance=0.9, input_transform="euclidean", lift=LIFT, dtype=torch.float64).load_file(path)


def test_a_version_3_file_loads_with_a_dim_scale_of_ones(tmp_path):
    """A file written before format 4 (no input_dim_scale) loads as it did: the same rows seen, the same novelty."""
    memory, path = saved(tmp_path, transform="euclidean")
    _, tensors = load_art_file(path)
    tensors = older_tensors(tensors, "3")
    rewrite(path, tensors, format_version="3")
    loaded = ARTMemory.from_pretrained(path)
    assert torch.equal(loaded.input_dim_scale, torch.ones(5, dtype=torch.float64))
    assert_same_state(memory, loaded)
    test = torch.from_numpy(rows(10, seed=12))
    assert torch.equal(loaded.novelty(test), memory.novelty(test))
    # a fitted standardize memory loading it takes the ones, as it takes the file's center and scale
    into = ARTMemory(5, vigilance=0.9, input_transform="euclidean", lift=LIFT, dtype=torch.float64)
    into.input_dim_scale.fill_(3.0)
    assert torch.equal(into.load_file(path).input_dim_scale, torch.ones(5, dtype=torch.float64))
    # version 3 knew no "standardize", and holds no input_dim_scale
    rewrite(path, tensors, input_transform="standardize")
    with pytest.raises(ValueError, match="bad metadata input_transform='standardize'"):
        load_art_file(path)
    memory.save_pretrained(tmp_path)
    rewrite(path, format_version="3")
    with pytest.raises(ValueError, match="expected tensors .* found .*input_dim_scale"):
        load_art_file(path)


def dim_scale_damage():
    ones = torch.ones(5, dtype=torch.float64)
    return {
        "zero": (ones.index_fill(0, torch.tensor([2]), 0.0), "input_dim_scale must be finite and > 0"),
        "negative": (-ones, "input_dim_scale must be finite and > 0"),
        "inf": (ones.index_fill(0, torch.tensor([0]), float("inf")), "input_dim_scale must be finite and > 0"),
        "nan": (ones.index_fill(0, torch.tensor([4]), float("nan")), "input_dim_scale must be finite and > 0"),
        "shape": (torch.ones(4, dtype=torch.float64), r"input_dim_scale is torch.float64 of shape \(4,\); expected"),
        "dtype": (torch.ones(5, dtype=torch.long), r"input_dim_scale is torch.int64 of shape \(5,\); expected floats"),
    }


@pytest.mark.parametrize("name", list(dim_scale_damage()))
def test_a_damaged_dim_scale_is_refused_naming_it(tmp_path, name):
    scale, message = dim_scale_damage()[name]
    memory, path = saved(tmp_path)
    _, tensors = load_art_file(path)
    rewrite(path, {**tensors, "input_dim_scale": scale})
    into = ARTMemory(5, vigilance=0.9, input_transform="standardize", lift=LIFT, dtype=torch.float64)
    into.fit_input_transform(torch.from_numpy(rows(20, seed=13)))
    before = {key: value.clone() for key, value in into.named_buffers()}
    for load in (ARTMemory.from_pretrained, load_art_file, into.load_file):
        with pytest.raises(ValueError, match=message) as error:
            load(path)
        assert str(path) in str(error.value)
    assert all(torch.equal(value, before[key]) for key, value in into.named_buffers())  # unchanged


def test_a_dim_scale_other_than_ones_is_refused_for_the_other_transforms(tmp_path):
    _, path = saved(tmp_path, transform="euclidean")
    _, tensors = load_art_file(path)
    rewrite(path, {**tensors, "input_dim_scale": torch.full((5,), 2.0, dtype=torch.float64)})
    with pytest.raises(ValueError, match="input_dim_scale must be all ones for input_transform 'euclidean'"):
        load_art_file(path)


def test_the_checksum_covers_the_dim_scale(tmp_path):
    """An edited input_dim_scale under the old checksum is refused: the file is damaged."""
    _, path = saved(tmp_path)
    with open(path, "rb") as f:
        data = f.read()
    metadata = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
    _, tensors = load_art_file(path)
    tensors["input_dim_scale"] = tensors["input_dim_scale"] * 1.5  # still finite and > 0
    with open(path, "wb") as f:
        f.write(safetensors_save(tensors, metadata))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ARTMemory.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------------------------
# On a model


def test_fit_art_memory_with_standardize_and_the_model_round_trip(tmp_path):
    from conftest import tiny_model

    from modeling_gptb.art_report import calibrate_art_memory, fit_art_memory, sequence_scores
    from modeling_gptb.modeling_gptb import GPTBLMHeadModel

    model = tiny_model(art_enabled=True, art_vigilance=0.9)
    generator = torch.Generator().manual_seed(0)
    training = torch.randint(1, 59, (40, 8), generator=generator)
    held_out = torch.randint(1, 59, (30, 8), generator=generator)
    fitted_ = fit_art_memory(model, training, input_transform="standardize", vigilance=0.95)
    memory = model.art_memory
    assert model.config.art_input_transform == "standardize" and memory.input_transform == "standardize"
    assert fitted_ == {"categories": memory.num_categories, "sequences": 40, "outlier_sequences": 0}
    assert memory.rule_dim == 33
    pooled = sequence_scores(model, training)["pooled"].double().numpy()
    c, sigma, s = reference_fit(pooled)
    np.testing.assert_allclose(memory.input_dim_scale.double().numpy(), sigma, rtol=1e-6)  # float32 buffers
    assert float(memory.input_scale) == pytest.approx(s, rel=1e-6)
    calibrate_art_memory(model, held_out, fpr=0.1)
    model.save_pretrained(tmp_path)
    loaded = GPTBLMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.art_input_transform == "standardize"
    assert_same_state(memory, loaded.art_memory)
    scores = sequence_scores(loaded, held_out)["pooled"]
    assert torch.equal(loaded.art_memory.novelty(scores), memory.novelty(scores))
