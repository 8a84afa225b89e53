"""Issue 12 item 8: ART output a person can read. Each test does what the user did and reads what they saw."""

import math

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from modeling_gptb.art_memory import ART_MEMORY_FILE, ARTMemory, ARTStatus, load_art_file
from modeling_gptb.art_report import art_report, format_art_report


def test_an_output_prints_its_statuses_by_name():
    memory = ARTMemory(3, vigilance=0.9, max_categories=2)
    out = memory.update(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]))
    assert out.status.tolist() == [1, 0, 1, 2]  # the codes stay tensors, for computing with
    text = repr(out)
    assert "status=['new', 'resonated', 'new', 'rejected']" in text and "category=[0, 0, 1, -1]" in text
    assert str(ARTStatus.REJECTED) == "rejected" and f"{ARTStatus(0)}" == "resonated"
    long = ARTMemory(3).update(torch.rand(100, 3))
    assert repr(long).count("'") == 2 * 8 and repr(long).endswith(", ... 100 rows)")


def novelty_bin(value):
    return min(int(math.floor(value * 1000)), 1999)  # 2000 bins of 1/1000 over [0, 2]


def test_novelty_percentile_places_a_value_among_the_training_rows():
    memory = ARTMemory(8, vigilance=0.8, max_categories=64)
    assert math.isnan(float(memory.novelty_percentile(torch.tensor([0.1]))[0]))  # nothing learned yet
    assert math.isnan(memory.novelty_quantile(0.5))
    generator = torch.Generator().manual_seed(0)
    training = torch.cat([memory.update(torch.randn(50, 8, generator=generator)).novelty for _ in range(4)]).tolist()
    assert int(memory.novelty_histogram.sum()) == len(training) == 200
    for query in (0.0, 0.05, 0.2, 0.5, 1.0, 1.7):
        below = sum(novelty_bin(t) < novelty_bin(query) for t in training)
        same = sum(novelty_bin(t) == novelty_bin(query) for t in training)
        expected = 100 * (below + same / 2) / len(training)
        assert float(memory.novelty_percentile(torch.tensor([query]))[0]) == pytest.approx(expected)
    median = memory.novelty_quantile(0.5)
    assert sum(t <= median + 0.0005 for t in training) >= 100 and sum(t < median - 0.0005 for t in training) < 100
    # classify learns nothing, and counts nothing
    memory.classify(torch.randn(10, 8, generator=generator))
    assert int(memory.novelty_histogram.sum()) == 200


def test_the_training_novelty_travels_with_the_memory(tmp_path):
    memory = ARTMemory(4, max_categories=8)
    memory.update(torch.randn(30, 4))
    memory.save_pretrained(tmp_path)
    _, tensors = load_art_file(tmp_path / ART_MEMORY_FILE)
    assert torch.equal(tensors["novelty_histogram"], memory.novelty_histogram)
    assert torch.equal(ARTMemory.from_pretrained(tmp_path).novelty_histogram, memory.novelty_histogram)
    assert "novelty_histogram" in memory.state_dict()  # so Trainer's resume keeps it
    memory.reset()
    assert not memory.novelty_histogram.any()


@pytest.fixture
def trained():
    """A tiny GPTB model whose memory learned from a handful of sequences."""
    model = tiny_model(art_enabled=True, art_vigilance=0.9).train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randint(1, 59, (8, 6), generator=generator))
    return model.eval()


def test_the_report_says_what_a_text_would_do_and_where_its_novelty_sits(trained):
    tokenizer = tiny_tokenizer()
    texts = ["w1 w2 w3 w4", "w50 w7 w33 w21 w9"]
    report = art_report(trained, tokenizer, texts)
    assert report["vigilance"] == 0.9
    training = report["training_novelty"]
    assert list(training) == [0.5, 0.9, 0.99] and training[0.5] <= training[0.9] <= training[0.99]
    text = format_art_report(report)
    assert "vigilance 0.9" in text and "novelty of the training sequences: 50th percentile" in text
    for item in report["texts"]:
        assert 0 <= item["percentile"] <= 100
        if item["status"] == "resonated":
            assert item["verdict"].startswith(f"familiar: resonates with category #{item['category']}")
        else:
            assert item["category"] == -1 and item["verdict"].startswith("novel: no category passes")
        lines = text.splitlines()
        at = lines.index(f"  {item['text']!r}")
        line = lines[at + 1]
        assert f"{item['novelty']:.3f}" in line and "percentile" in line and item["verdict"] in line
        assert "category -1" not in line and "new " not in line
        assert lines[at + 2].startswith(f"    nearest category #{item['nearest']['category']} (")


def test_the_scored_texts_have_a_header_saying_what_they_are(trained):
    # Issue 20 item 7: after `gptb train` eight "novelty ... resonates with category #5" lines had no header.
    report = art_report(trained, tiny_tokenizer(), ["w1 w2 w3 w4", "w50 w7"])
    lines = format_art_report(report, texts="2 held-out evaluation texts").splitlines()
    header = next(i for i, line in enumerate(lines) if "2 held-out evaluation texts" in line)
    assert "novelty (1 - similarity to the nearest category)" in lines[header]
    assert lines[header + 1] == "  'w1 w2 w3 w4'" and "(novelty " in lines[header + 2], lines
    assert "  'w50 w7'" in lines[header + 3 :]
    assert "the given texts:" in format_art_report(report)  # `gptb art-report --text ...`


def test_a_text_that_would_be_new_says_novel_not_category_minus_one():
    """The report's row `novelty 0.119  new  category -1`: a classify-mode row that would be new."""
    model = tiny_model(art_enabled=True, art_vigilance=1.0).train()  # nothing but an exact copy resonates
    model(torch.randint(1, 59, (4, 6), generator=torch.Generator().manual_seed(1)))
    report = art_report(model.eval(), tiny_tokenizer(), ["w5 w6 w7"])
    (item,) = report["texts"]
    assert item["status"] == "new" and item["verdict"].startswith("novel: no category passes the vigilance")
    assert "    novel: no category passes the vigilance (not calibrated)  (novelty" in format_art_report(report)


def test_a_memory_that_learned_nothing_says_so():
    model = tiny_model(art_enabled=True).eval()
    report = art_report(model, tiny_tokenizer(), ["w1 w2"])
    assert report["training_novelty"] is None and report["texts"][0]["percentile"] is None
    assert report["texts"][0]["nearest"] is None
    text = format_art_report(report)
    assert "novel: no category passes the vigilance" in text and "percentile" not in text.splitlines()[-1]


def test_percentiles_are_spelled_as_ordinals_in_every_verdict():
    from modeling_gptb.art_report import _ordinal, _verdict_words

    expected = {0: "0th", 1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 11: "11th", 12: "12th", 13: "13th", 21: "21st"}
    expected |= {22: "22nd", 83: "83rd", 100: "100th", 101: "101st", 111: "111th", 112: "112th"}
    assert {n: _ordinal(n) for n in expected} == expected
    assert "(83rd percentile; novel above 95%)" in _verdict_words(False, 82.6, 0.05)
    assert "less familiar than 97% of in-domain text" in _verdict_words(True, 97.2, 0.05)


def test_a_category_of_one_sequence_is_not_plural():
    from modeling_gptb.art_report import _category_line

    one = {"category": 4, "count": 1, "created_at": 7, "exemplar": "abc"}
    assert _category_line(one) == "#4 (1 sequence, created at sequence 7, e.g. 'abc')"
    assert _category_line({**one, "count": 3, "created_at": -1, "exemplar": None}) == "#4 (3 sequences)"
