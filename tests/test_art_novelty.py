"""What the ART memory sees (input transforms), its calibrated verdict and its category descriptions, against
docs/design.md#what-the-memory-sees and #calibrated-verdict written out in float64."""

import math

import pytest
import torch
from test_art_memory import rewrite

from modeling_gptb.art_file import load_art_file
from modeling_gptb.art_memory import ART_EXEMPLAR_TOKENS, ARTMemory, ARTStatus


def rows(n, dim=6, seed=0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) + shift


def lifted(x, center, scale, lift):
    """The "euclidean" transform from its definition: [(x - c) / s, lift]."""
    return torch.cat([(x - center) / scale, torch.full((x.shape[0], 1), lift, dtype=torch.float64)], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Input transforms


def test_fit_input_transform_is_the_mean_and_rms_distance_and_resets_the_memory():
    x = rows(50, shift=3.0)
    memory = ARTMemory(6, vigilance=0.5, input_transform="euclidean", dtype=torch.float64)
    memory.fit_input_transform(x)
    memory.update(x[:5])
    center = x.mean(0)
    scale = math.sqrt(float(((x - center) ** 2).sum(1).mean()))
    torch.testing.assert_close(memory.input_center, center, rtol=0, atol=1e-12)
    assert float(memory.input_scale) == pytest.approx(scale, rel=1e-12)
    memory.fit_input_transform(x + 1)  # refitting forgets categories learned in the old coordinates
    assert memory.num_categories == 0 and int(memory.rows_seen) == 0


@pytest.mark.parametrize("transform", ["center", "euclidean"])
def test_a_transformed_memory_is_the_plain_memory_on_transformed_rows(transform):
    x, test = rows(80, seed=1), rows(20, seed=2)
    memory = ARTMemory(6, vigilance=0.6, input_transform=transform, lift=2.0, dtype=torch.float64)
    memory.fit_input_transform(x)
    center, scale = x.mean(0), float(memory.input_scale)
    seen = x - center if transform == "center" else lifted(x, center, scale, 2.0)
    plain = ARTMemory(seen.shape[1], vigilance=0.6, dtype=torch.float64)
    out, reference = memory.update(x), plain.update(seen)
    assert torch.equal(out.category, reference.category) and torch.equal(out.status, reference.status)
    test_seen = test - center if transform == "center" else lifted(test, center, scale, 2.0)
    torch.testing.assert_close(memory.novelty(test), plain.novelty(test_seen), rtol=0, atol=1e-12)
    assert memory.rule_dim == seen.shape[1] and memory.stored_dim == seen.shape[1]


def test_the_euclidean_novelty_is_the_squared_distance_to_first_order():
    """1 - cos([u, L], [v, L]) = |u - v|^2 / (2 L^2) + O(|u|^4 / L^4) for u, v of unit scale: the cosine rule then
    decides by Euclidean distance."""
    x = rows(200, seed=3)
    memory = ARTMemory(6, vigilance=0.0, input_transform="euclidean", lift=100.0, dtype=torch.float64)
    memory.fit_input_transform(x)
    memory.update(x[:1])  # one category, the first row
    test = rows(10, seed=4)
    scale = float(memory.input_scale)
    expected = ((test - x[0]) ** 2).sum(1) / (2 * scale**2 * 100.0**2)
    torch.testing.assert_close(memory.novelty(test), expected, rtol=2e-3, atol=0)


def test_transform_errors_are_clear():
    with pytest.raises(ValueError, match="input_transform must be one of"):
        ARTMemory(4, input_transform="whiten")
    with pytest.raises(ValueError, match="needs rule='cosine'"):
        ARTMemory(4, rule="fuzzy", input_transform="center")
    with pytest.raises(ValueError, match="lift must be a finite number > 0"):
        ARTMemory(4, input_transform="euclidean", lift=0.0)
    memory = ARTMemory(4, input_transform="euclidean")
    with pytest.raises(ValueError, match="is not fitted: call fit_input_transform"):
        memory.update(torch.ones(2, 4))
    with pytest.raises(ValueError, match="every row is the same"):
        memory.fit_input_transform(torch.ones(3, 4))
    with pytest.raises(ValueError, match="must be finite"):
        memory.fit_input_transform(torch.tensor([[1.0, math.nan, 0, 0]]))
    assert not memory.input_fitted and memory.num_categories == 0


# ---------------------------------------------------------------------------------------------------------------------
# Calibration


def calibrated(score=None, fpr=0.1):
    memory = ARTMemory(6, vigilance=0.9, input_transform="euclidean", dtype=torch.float64)
    memory.fit_input_transform(rows(100, seed=5))
    memory.update(rows(100, seed=5))
    held_out, surprise = rows(40, seed=6), torch.linspace(2.0, 3.0, 40, dtype=torch.float64)
    report = memory.calibrate(held_out, fpr=fpr, surprise=None if score == "novelty" else surprise, score=score)
    return memory, held_out, surprise, report


def test_the_threshold_flags_at_most_fpr_of_the_calibration_rows_and_no_fewer_than_it_must():
    memory, held_out, _, report = calibrated(score="novelty", fpr=0.1)
    novelty = memory.novelty(held_out)
    flagged = memory.verdict(novelty)["novel"]
    assert int(flagged.sum()) == 4  # 10% of 40, where the held-out novelty has no ties
    assert report["threshold"] == float(novelty.sort().values[35])  # the 36th of 40: 4 lie above
    assert report["score"] == "novelty" and report["rows"] == 40 and report["combined_threshold"] is None


def test_the_combined_score_is_the_sum_of_z_scores():
    memory, held_out, surprise, report = calibrated()
    novelty = memory.novelty(held_out)
    expected = (novelty - novelty.mean()) / novelty.std() + (surprise - surprise.mean()) / surprise.std()
    verdict = memory.verdict(novelty, surprise)
    torch.testing.assert_close(verdict["score"], expected, rtol=0, atol=1e-12)
    assert report["score"] == "combined" and int(verdict["novel"].sum()) == 4
    assert report["combined_threshold"] == float(expected.sort().values[35])
    # percentiles: the share of calibration rows below, interpolated between the stored 1% quantiles
    percentile = verdict["percentile"]
    assert percentile.min() == 0.0 and percentile.max() == 100.0
    ranks = expected.argsort().argsort().double()
    assert torch.corrcoef(torch.stack([ranks, percentile]))[0, 1] > 0.99
    with pytest.raises(ValueError, match="pass surprise too"):
        memory.verdict(novelty)


def test_calibration_errors_are_clear():
    memory = ARTMemory(6)
    with pytest.raises(ValueError, match="not calibrated"):
        memory.verdict(torch.zeros(2))
    with pytest.raises(ValueError, match="a memory that has learned"):
        memory.calibrate(rows(5))
    memory.update(rows(5))
    with pytest.raises(ValueError, match=r"fpr must be a number in \(0, 1\)"):
        memory.calibrate(rows(5), fpr=0.0)
    with pytest.raises(ValueError, match="surprise must be"):
        memory.calibrate(rows(5), surprise=torch.zeros(4))
    with pytest.raises(ValueError, match="score='combined' needs surprise"):
        memory.calibrate(rows(5), score="combined")
    assert memory.calibration_report() is None


def test_the_new_state_travels_in_the_art_file_not_the_state_dict():
    """Model folders saved before it existed hold no such weights, and must keep loading."""
    assert set(ARTMemory(4).state_dict()) == {"weight", "category_counts", "num_committed", "novelty_histogram"}


def test_reset_forgets_the_calibration_but_keeps_the_fit():
    memory, *_ = calibrated()
    memory.reset()
    assert memory.calibration_report() is None and memory.input_fitted


# ---------------------------------------------------------------------------------------------------------------------
# Category descriptions


def test_categories_remember_when_they_were_created_and_their_exemplar():
    memory = ARTMemory(6, vigilance=0.99, max_categories=4, dtype=torch.float64)
    x = rows(10, seed=7)
    tokens = torch.arange(10 * 20).view(10, 20)
    first = memory.update(x[:3], exemplars=tokens[:3])
    second = memory.update(x[3:], exemplars=tokens[3:, :5])  # shorter exemplars are padded with -1
    status = torch.cat([first.status, second.status])
    category = torch.cat([first.category, second.category])
    for row in range(10):  # the loop's account: the row that created a category, its index, its first tokens
        if status[row] == ARTStatus.NEW:
            description = memory.describe_category(int(category[row]))
            assert description["created_at"] == row
            width = ART_EXEMPLAR_TOKENS if row < 3 else 5
            assert description["exemplar"] == tokens[row, :width].tolist()
    assert int(memory.rows_seen) == 10
    with pytest.raises(ValueError, match="exemplars must have one row per input row"):
        memory.update(x[:2], exemplars=tokens[:3])


# ---------------------------------------------------------------------------------------------------------------------
# The file


def test_transform_calibration_and_descriptions_travel_in_the_file(tmp_path):
    memory, held_out, surprise, report = calibrated()
    memory.update(rows(3, seed=8, shift=5.0), exemplars=torch.ones(3, 4, dtype=torch.long))
    path = memory.save_pretrained(tmp_path)
    loaded = ARTMemory.from_pretrained(tmp_path)
    assert loaded.input_transform == "euclidean" and loaded.lift == memory.lift
    loaded_buffers = dict(loaded.named_buffers())
    for name, tensor in memory.named_buffers():
        if name in ("category_created", "category_exemplars", "weight", "category_counts"):
            k = memory.num_categories
            assert torch.equal(tensor[:k], loaded_buffers[name][:k]), name
        else:
            assert torch.equal(tensor, loaded_buffers[name]), name
    assert loaded.calibration_report() == report
    # a memory built with another transform refuses the file, and a damaged fit is refused by the reader
    with pytest.raises(ValueError, match="input_transform is 'euclidean' in the file but 'none' here"):
        ARTMemory(6, vigilance=0.9, dtype=torch.float64).load_file(path)
    _, tensors = load_art_file(path)
    rewrite(path, {**tensors, "input_scale": torch.tensor([-1.0], dtype=torch.float64)})
    with pytest.raises(ValueError, match="input_scale >= 0"):
        load_art_file(path)


def test_a_version_2_file_loads_as_an_untransformed_uncalibrated_memory(tmp_path):
    """Files written before format 3 (three tensors, no transform metadata) still load, unchanged."""
    memory = ARTMemory(6, vigilance=0.8, dtype=torch.float64)
    memory.update(rows(30, seed=9))
    path = memory.save_pretrained(tmp_path)
    _, tensors = load_art_file(path)
    old = {name: tensors[name] for name in ("prototypes", "counts", "novelty_histogram")}
    rewrite(path, old, format_version="2", input_transform=None, lift=None)
    loaded = ARTMemory.from_pretrained(tmp_path)
    assert loaded.input_transform == "none" and loaded.calibration_report() is None
    assert torch.equal(loaded.prototypes, memory.prototypes) and torch.equal(loaded.counts, memory.counts)
    assert int(loaded.rows_seen) == 30 and loaded.describe_category(0)["created_at"] == -1


# ---------------------------------------------------------------------------------------------------------------------
# On a model: statuses by name, exemplars, fit, calibration and the report


def test_the_output_names_its_art_statuses():
    from conftest import tiny_model

    model = tiny_model(art_enabled=True, art_vigilance=0.99).train()
    ids = torch.randint(1, 59, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [0] * 6, [0, 0, 1, 1, 1, 1]])
    out = model(ids, attention_mask=mask)
    assert out.art_status.dtype == torch.long  # the codes stay a tensor
    assert out.art_status_names() == [str(ARTStatus(int(code))) for code in out.art_status[:1]] + [
        "skipped",
        str(ARTStatus(int(out.art_status[2]))),
    ]
    # the category the first row created keeps its first tokens; the left-padded row's start past its pads
    assert model.art_memory.describe_category(0)["exemplar"] == ids[0].tolist()
    if out.art_status[2] == ARTStatus.NEW:
        assert model.art_memory.describe_category(int(out.art_category[2]))["exemplar"] == ids[2, 2:].tolist()


def test_first_valid_tokens_skips_padding_on_either_side():
    from modeling_gptb.modeling_gptb import first_valid_tokens

    ids = torch.tensor([[5, 6, 7, 8], [9, 9, 3, 4], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    assert first_valid_tokens(ids, mask, count=3).tolist() == [[5, 6, 7], [3, 4, -1], [1, 2, -1]]
    assert first_valid_tokens(ids, None, count=2).tolist() == [[5, 6], [9, 9], [1, 2]]


def test_fit_calibrate_and_report_on_a_model():
    from conftest import tiny_model, tiny_tokenizer

    from modeling_gptb.art_report import art_report, calibrate_art_memory, fit_art_memory, format_art_report

    model = tiny_model(art_enabled=True, art_vigilance=0.9, art_input_transform="euclidean")
    generator = torch.Generator().manual_seed(0)
    training, held_out = torch.randint(1, 30, (40, 8), generator=generator), torch.randint(1, 30, (40, 8))
    with pytest.raises(ValueError, match="is not fitted"):
        model.train()(training[:2])
    fitted = fit_art_memory(model.eval(), training)
    assert fitted == {"categories": model.art_memory.num_categories, "sequences": 40, "outlier_sequences": 0}
    calibration = calibrate_art_memory(model, held_out, fpr=0.1)
    assert calibration["score"] == "combined" and calibration["rows"] == 40
    report = art_report(model, tiny_tokenizer(), ["w1 w2 w3 w4 w5", "w58 w57 w58 w57 w58 w57"])
    text = format_art_report(report)
    assert "input euclidean" in text and "calibrated on 40 held-out in-domain sequences" in text
    for item in report["texts"]:
        assert item["verdict"].startswith("novel: less familiar than" if item["novel"] else "familiar: as familiar")
        assert 0 <= item["percentile"] <= 100 and item["nearest"]["count"] >= 1
        assert item["nearest"]["created_at"] >= 0 and item["nearest"]["exemplar"].startswith("w")


def test_the_config_fields_build_the_memory_and_bad_values_are_refused():
    from modeling_gptb import art_memory, configuration_gptb
    from modeling_gptb.configuration_gptb import GPTBConfig
    from modeling_gptb.modeling_gptb import GPTBLMHeadModel

    assert configuration_gptb.ART_INPUT_TRANSFORMS == art_memory.ART_INPUT_TRANSFORMS
    config = GPTBConfig(n_embd=8, n_layer=1, n_head=2, vocab_size=16, state_size=2, art_enabled=True)
    assert GPTBLMHeadModel(config).art_memory.input_transform == "none"  # today's input stays the default
    config = GPTBConfig(**{**config.to_dict(), "art_input_transform": "euclidean", "art_lift": 2.5})
    memory = GPTBLMHeadModel(config).art_memory
    assert (memory.input_transform, memory.lift, memory.rule_dim, memory.stored_dim) == ("euclidean", 2.5, 9, 9)
    with pytest.raises(ValueError, match="art_input_transform must be one of"):
        GPTBConfig(art_input_transform="pca")
    with pytest.raises(ValueError, match="needs art_rule='cosine'"):
        GPTBConfig(art_input_transform="center", art_rule="fuzzy")
    with pytest.raises(ValueError, match="art_lift must be > 0 and finite"):
        GPTBConfig(art_lift=float("inf"))
