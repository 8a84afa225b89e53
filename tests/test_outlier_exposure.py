"""The outlier probe (outlier exposure) and the "outliers" verdict, against docs/design.md#outlier-exposure and
#calibrated-verdict written out in float64 (numpy), and in the ART file."""

import numpy as np
import pytest
import torch
from test_art_memory import older_tensors, rewrite

from modeling_gptb.art_file import load_art_file
from modeling_gptb.art_memory import OUTLIER_SCORE_WEIGHTS, VERDICT_SCORES, ARTMemory

DIM = 5
SHIFT = np.array([1.5, 0.0, -1.0, 0.0, 0.5])


def rows(n, seed, shift=0.0):
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, DIM)) + shift


def fitted(l2=0.05):
    memory = ARTMemory(DIM, vigilance=0.9, input_transform="standardize", dtype=torch.float64)
    inliers = torch.from_numpy(rows(60, seed=0))
    memory.fit_input_transform(inliers)
    memory.update(inliers)
    memory.fit_outlier_exposure(inliers, torch.from_numpy(rows(40, seed=1, shift=SHIFT)), l2=l2)
    return memory


def calibrated(fpr=0.1):
    memory = fitted()
    held_out, surprise = torch.from_numpy(rows(40, seed=2)), torch.linspace(2.0, 3.0, 40, dtype=torch.float64)
    return memory, held_out, surprise, memory.calibrate(held_out, fpr=fpr, surprise=surprise)


def test_the_probe_is_the_regularised_logistic_regression_on_standardised_rows():
    l2 = 0.05
    memory = fitted(l2)
    inliers, outliers = rows(60, seed=0), rows(40, seed=1, shift=SHIFT)
    x = np.concatenate([inliers, outliers])
    y = np.concatenate([np.zeros(60), np.ones(40)])
    center, scale, weight = memory.outlier_probe.numpy()
    np.testing.assert_allclose(center, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(scale, x.std(0, ddof=1), rtol=1e-12)
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    logits = memory.outlier_score(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, z @ weight + float(memory.outlier_bias), rtol=1e-10, atol=1e-12)
    # the optimum from the definition: the gradient of mean BCE + l2 |w|^2 vanishes at the fit
    residual = 1 / (1 + np.exp(-logits)) - y
    assert np.abs(z.T @ residual / len(y) + 2 * l2 * weight).max() < 1e-5 and abs(residual.mean()) < 1e-5
    assert (logits[60:].mean() - logits[:60].mean()) > 1.0  # it tells the outliers apart


def test_the_outliers_score_is_the_weighted_one_sided_sum_of_z_scores():
    memory, held_out, surprise, report = calibrated(fpr=0.1)
    assert report["score"] == "outliers" and VERDICT_SCORES == ("novelty", "combined", "outliers")
    novelty = memory.novelty(held_out).numpy()
    probe = memory.outlier_score(held_out).numpy()
    s = surprise.numpy()

    def z(values, calibration):
        return (values - calibration.mean()) / calibration.std(ddof=1)

    test = rows(9, seed=3, shift=0.7 * SHIFT)
    test_novelty = memory.novelty(torch.from_numpy(test)).numpy()
    test_probe = memory.outlier_score(torch.from_numpy(test)).numpy()
    test_surprise = np.linspace(1.0, 4.0, 9)
    want = (
        OUTLIER_SCORE_WEIGHTS["novelty"] * z(test_novelty, novelty)
        + OUTLIER_SCORE_WEIGHTS["surprise"] * z(test_surprise, s)
        + OUTLIER_SCORE_WEIGHTS["outliers"] * np.maximum(z(test_probe, probe), 0.0)
    )
    assert OUTLIER_SCORE_WEIGHTS == {"novelty": 1.0, "surprise": 0.5, "outliers": 2.0}
    verdict = memory.verdict(test_novelty, torch.from_numpy(test_surprise), torch.from_numpy(test_probe))
    np.testing.assert_allclose(verdict["score"].numpy(), want, rtol=0, atol=1e-12)
    assert (z(test_probe, probe) < 0).any()  # the floor at 0 is exercised
    # the threshold: 10% of the 40 calibration rows lie above it
    calibration_score = memory.verdict(novelty, surprise, torch.from_numpy(probe))
    assert int(calibration_score["novel"].sum()) == 4
    assert report["combined_threshold"] == float(calibration_score["score"].sort().values[35])
    assert report["outliers_mean"] == pytest.approx(probe.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="pass surprise and outliers"):
        memory.verdict(test_novelty, torch.from_numpy(test_surprise))


def test_the_default_score_is_the_best_the_arguments_allow():
    memory, held_out, surprise, report = calibrated()
    assert report["score"] == "outliers"
    assert memory.calibrate(held_out)["score"] == "novelty"
    assert memory.calibrate(held_out, surprise=surprise, score="combined")["score"] == "combined"
    plain = ARTMemory(DIM, vigilance=0.9, dtype=torch.float64)
    plain.update(torch.from_numpy(rows(30, seed=4)))
    assert plain.calibrate(held_out, surprise=surprise)["score"] == "combined"
    assert plain.calibration_report()["outliers_mean"] is None
    with pytest.raises(ValueError, match="score='outliers' needs the outlier probe"):
        plain.calibrate(held_out, surprise=surprise, score="outliers")
    with pytest.raises(ValueError, match="no outlier probe: call fit_outlier_exposure"):
        plain.outlier_score(held_out)
    with pytest.raises(ValueError, match="score='outliers' needs surprise"):
        memory.calibrate(held_out, score="outliers")


def test_bad_input_is_refused_and_changes_nothing():
    memory, held_out, surprise, report = calibrated()
    before = {name: buffer.clone() for name, buffer in memory.named_buffers()}
    inliers = torch.from_numpy(rows(10, seed=5))
    cases = [
        ((inliers, torch.zeros(3, DIM + 1)), {}, f"dim={DIM} features per row, got {DIM + 1}"),
        ((inliers, torch.full((3, DIM), float("nan"))), {}, "NaN"),
        ((inliers[:1], inliers), {}, "at least 2 inlier rows and 1 outlier row, got 1 and 10"),
        ((inliers, inliers), {"l2": 0.0}, "l2 must be a positive finite number, got 0.0"),
        ((inliers, inliers), {"l2": True}, "l2 must be a positive finite number"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            memory.fit_outlier_exposure(*args, **kwargs)
        for name, buffer in memory.named_buffers():
            assert torch.equal(buffer, before[name]), (message, name)
    assert memory.calibration_report() == report


def test_a_new_probe_forgets_the_calibration_that_used_the_old_one_only():
    memory, held_out, surprise, _ = calibrated()
    outliers = torch.from_numpy(rows(20, seed=6, shift=-SHIFT))
    memory.fit_outlier_exposure(torch.from_numpy(rows(60, seed=0)), outliers)
    assert memory.calibration_report() is None  # its "outliers" threshold was the old probe's
    report = memory.calibrate(held_out, surprise=surprise, score="combined")
    memory.fit_outlier_exposure(torch.from_numpy(rows(60, seed=0)), outliers)
    assert memory.calibration_report() == report  # the combined score never read the probe
    memory.reset()  # forgetting the categories keeps the probe, as it keeps the input transform
    assert memory.outliers_fitted and memory.input_fitted


# ---------------------------------------------------------------------------------------------------------------------
# The file (format 5)


def test_the_probe_and_its_calibration_travel_in_the_file_bit_exactly(tmp_path):
    memory, held_out, surprise, report = calibrated()
    path = memory.save_pretrained(tmp_path)
    loaded = ARTMemory.from_pretrained(tmp_path)
    assert torch.equal(loaded.outlier_probe, memory.outlier_probe)
    assert torch.equal(loaded.outlier_bias, memory.outlier_bias)
    assert loaded.calibration_report() == report
    test = torch.from_numpy(rows(7, seed=8, shift=SHIFT))
    assert torch.equal(loaded.outlier_score(test), memory.outlier_score(test))
    assert "outlier_probe" not in memory.state_dict()  # in the ART file, so old model folders keep loading
    _, tensors = load_art_file(path)
    assert tuple(tensors["calibration"].shape) == (11,) and tuple(tensors["outlier_probe"].shape) == (3, DIM)


def test_a_version_4_file_loads_without_a_probe_and_with_its_calibration(tmp_path):
    memory = ARTMemory(DIM, vigilance=0.9, input_transform="standardize", dtype=torch.float64)
    memory.fit_input_transform(torch.from_numpy(rows(60, seed=0)))
    memory.update(torch.from_numpy(rows(60, seed=0)))
    held_out, surprise = torch.from_numpy(rows(40, seed=2)), torch.linspace(2.0, 3.0, 40, dtype=torch.float64)
    report = memory.calibrate(held_out, surprise=surprise)
    path = memory.save_pretrained(tmp_path)
    _, tensors = load_art_file(path)
    rewrite(path, older_tensors(tensors, "4"), format_version="4")
    loaded = ARTMemory.from_pretrained(tmp_path)
    assert not loaded.outliers_fitted and loaded.calibration_report() == report == {**report, "score": "combined"}
    novelty = loaded.novelty(held_out)
    assert torch.equal(loaded.verdict(novelty, surprise)["score"], memory.verdict(novelty, surprise)["score"])
    # a version 4 file holds nine calibration fields and no probe
    rewrite(path, tensors, format_version="4")
    with pytest.raises(ValueError, match="expected tensors .* found .*outlier_bias"):
        load_art_file(path)


def probe_damage(tensors):
    probe, bias, calibration = tensors["outlier_probe"], tensors["outlier_bias"], tensors["calibration"]
    no_probe = {"outlier_probe": torch.zeros_like(probe), "outlier_bias": torch.zeros_like(bias)}
    return {
        "inf": ({"outlier_probe": probe.index_fill(1, torch.tensor([0]), float("inf"))}, "must be finite"),
        "nan bias": ({"outlier_bias": torch.full_like(bias, float("nan"))}, "must be finite"),
        "zero scale": (
            {"outlier_probe": torch.stack([probe[0], probe[1].index_fill(0, torch.tensor([2]), 0.0), probe[2]])},
            "scale row must be > 0 in every dimension",
        ),
        "weights without a scale": (
            {"outlier_probe": torch.stack([probe[0], torch.zeros_like(probe[1]), probe[2]])},
            "or the probe all zeros",
        ),
        "outliers score without a probe": (no_probe, r"score field \(index 8\) one of \[0, 1\]"),
        "unknown score": ({"calibration": calibration.index_fill(0, torch.tensor([8]), 7.0)}, r"one of \[0, 1, 2\]"),
        "shape": ({"outlier_probe": probe[:2]}, r"outlier_probe is torch.float64 of shape \(2, 5\); expected"),
    }


DAMAGE = ("inf", "nan bias", "zero scale", "weights without a scale", "outliers score without a probe",
          "unknown score", "shape")  # fmt: skip


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_probe_is_refused_naming_it_and_changes_nothing(tmp_path, case):
    memory, *_ = calibrated()
    path = memory.save_pretrained(tmp_path)
    _, tensors = load_art_file(path)
    changes, message = probe_damage(tensors)[case]
    rewrite(path, {**tensors, **changes})
    into = fitted()
    before = {name: buffer.clone() for name, buffer in into.named_buffers()}
    for load in (ARTMemory.from_pretrained, load_art_file, into.load_file):
        with pytest.raises(ValueError, match=message) as error:
            load(path)
        assert str(path) in str(error.value)
    for name, buffer in into.named_buffers():
        assert torch.equal(buffer, before[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# On a model


def test_fit_with_outliers_then_calibrate_and_report_the_outliers_verdict():
    from conftest import tiny_model, tiny_tokenizer

    from modeling_gptb.art_report import art_report, calibrate_art_memory, fit_art_memory, format_art_report

    model, tokenizer = tiny_model(art_enabled=True), tiny_tokenizer()
    generator = torch.Generator().manual_seed(0)
    in_domain = torch.randint(1, 30, (40, 12), generator=generator)
    outliers = torch.randint(30, 59, (20, 12), generator=generator)
    fitted_on = fit_art_memory(model, in_domain[:30], input_transform="euclidean", vigilance=0.9, outlier_ids=outliers)
    assert fitted_on["outlier_sequences"] == 20 and model.art_memory.outliers_fitted
    report = calibrate_art_memory(model, in_domain[30:], fpr=0.2)
    assert report["score"] == "outliers" and report["rows"] == 10
    text = art_report(model, tokenizer, ["the model says"])
    item = text["texts"][0]
    # the report's score is the memory's verdict on the text's own novelty, surprise and probe score
    from modeling_gptb.art_report import sequence_scores

    ids = tokenizer("the model says", return_tensors="pt").input_ids
    scores = sequence_scores(model, ids)
    novelty = model.art_memory.novelty(scores["pooled"])
    want = model.art_memory.verdict(novelty, scores["surprise"], model.art_memory.outlier_score(scores["pooled"]))
    assert item["score"] == pytest.approx(float(want["score"][0]), rel=1e-9)
    assert "score outliers" in format_art_report(text)


def test_a_fit_that_fails_leaves_the_model_as_it_was():
    from conftest import tiny_model

    from modeling_gptb.art_report import fit_art_memory

    model = tiny_model(art_enabled=True)
    old_memory, old_config = model.art_memory, model.config.to_dict()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    same = torch.randint(1, 59, (1, 12), generator=torch.Generator().manual_seed(0)).repeat(5, 1)
    with pytest.raises(ValueError, match="every row is the same"):  # no spread to fit the transform on
        fit_art_memory(model, same, input_transform="euclidean", pooling="mean_std_max", pool_layers="all")
    assert model.art_memory is old_memory and model.config.to_dict() == old_config
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
