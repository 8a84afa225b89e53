"""Issue 19's goal on a model trained in the test: the calibrated verdict flags random characters and a non-English
sentence as novel, and calls held-out in-domain text familiar (>= 90% at the calibrated 5% threshold).

The model is small and briefly trained (byte tokenizer, width 64, 200 steps on the Python standard library's
docstrings, `stdlib-docs`), so that the test fits CI time; the full main-job model is not needed for this goal."""

import pytest
import torch

from modeling_gptb.art_report import art_report, calibrate_art_memory, fit_art_memory, format_art_report
from modeling_gptb.experiments import common

BLOCK = 48
NOVEL_TEXTS = {
    "random characters": "xq#7 ZK!p 0@vR ~j2% Lw9& Qz|4 }8mY ^t6$ Hb3* gE1+ uN5?",
    "German": "Die Katze schläft auf dem warmen Sofa, während draußen der kalte Regen fällt.",
}
# Not asserted: a Dutch sentence ("Het weer is vandaag erg mooi, dus wij gaan samen fietsen langs de rivier.") sits at
# the 94th percentile of in-domain text for this small byte-level model, just under the 95% threshold: plain Latin
# letters, no umlauts, and Dutch spelling close to English are too familiar to a model this size.


@pytest.fixture(scope="module")
def trained():
    tokenizer = common.make_tokenizer("byte", [])
    train = common.token_stream(common.load_texts("stdlib-docs", "train", 300_000), tokenizer)
    held_out = common.blocks_of(
        common.token_stream(common.load_texts("stdlib-docs", "validation", 60_000), tokenizer), BLOCK, 400
    )
    common.set_seed(0)
    model = common.gptb_model(
        tokenizer,
        {"n_embd": 64, "n_layer": 2, "n_head": 4},
        state_size=4,
        art_enabled=True,
        art_max_categories=256,
    )  # trained with today's input; the detector's memory is fitted afterwards
    torch.set_num_threads(1)
    common.train_model(model, common.BatchStream(train, 8 * BLOCK, 0), BLOCK, 200, {"lr": 3e-3, "weight_decay": 0.1})
    model.eval()
    reference = common.blocks_of(train, BLOCK)
    reference = reference[torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))[:400]]
    fitted = fit_art_memory(model, reference, input_transform="euclidean", vigilance=0.95)
    calibration = calibrate_art_memory(model, held_out[:200], fpr=0.05)
    return model, tokenizer, held_out[200:], fitted, calibration


def test_the_memory_stays_small_on_in_domain_training(trained):
    model, _, _, fitted, calibration = trained
    assert fitted["sequences"] == 400 and fitted["categories"] < model.art_memory.max_categories // 4
    assert calibration["score"] == "combined" and calibration["fpr"] == 0.05
    assert model.config.art_input_transform == "euclidean" and model.art_memory.input_transform == "euclidean"


def test_held_out_in_domain_text_resonates(trained):
    model, tokenizer, held_out, _, _ = trained
    texts = [tokenizer.decode(block) for block in held_out]
    report = art_report(model, tokenizer, texts)
    familiar = sum(not item["novel"] for item in report["texts"]) / len(report["texts"])
    assert familiar >= 0.90, familiar


@pytest.mark.parametrize("name", list(NOVEL_TEXTS))
def test_random_characters_and_other_languages_are_flagged_novel(trained, name):
    model, tokenizer, _, _, _ = trained
    report = art_report(model, tokenizer, [NOVEL_TEXTS[name]])
    (item,) = report["texts"]
    assert item["novel"] and item["verdict"].startswith("novel: less familiar than"), format_art_report(report)
