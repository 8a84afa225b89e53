"""The experiment runners at `--preset mini` (seconds each), and the detection metrics they report."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeling_gptb.experiments import EXPERIMENTS, common
from modeling_gptb.experiments.__main__ import main
from modeling_gptb.output_folder import KILL_ENV

REPO = Path(__file__).resolve().parents[1]

EXPECTED = {
    "sample_efficiency": (
        {"runs", "summary", "config", "seeds", "machine"},
        ["curves.png", "ablations.png", "positions.png"],
    ),
    "novelty": ({"per_seed", "summary", "config", "seeds", "machine"}, ["roc.png", "metrics.png"]),
    "continual": ({"runs", "summary", "config", "seeds", "machine"}, ["continual.png"]),
    "memory": ({"runs", "summary", "config", "seeds", "machine", "best_config"}, ["memory.png"]),
}


def _all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_mini_run_writes_report_json_and_plots(name, tmp_path):
    assert main([name, "--preset", "mini", "--out", str(tmp_path)]) == 0
    keys, plots = EXPECTED[name]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# ") and "mini" in report
    data = json.loads((tmp_path / "results.json").read_text())
    assert keys <= set(data) and data["experiment"] == name and data["seeds"] == [0]
    assert _all_finite(data)
    for plot in plots:
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plot in report


def test_sample_efficiency_summary_has_baselines_and_ablations(tmp_path):
    main(["sample_efficiency", "--preset", "mini", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert {"gptb", "gptb_norebias"} <= set(summary) and any(k.startswith("gpt2_ctx") for k in summary)
    for values in summary.values():
        assert values["final_bpb_mean"] > 0 and values["train_flops_per_token"] > 0
    assert "`gptb_selective` minus the control `gptb_norebias`" in (tmp_path / "report.md").read_text()


def test_sample_efficiency_variants_carry_their_state_update():
    from modeling_gptb.experiments import sample_efficiency

    specs = sample_efficiency.variants(sample_efficiency.PRESETS["memory"])
    assert set(specs) == {"gptb", "gptb_selective", "gptb_norebias", "gpt2_ctx64", "gpt2_ctx256"}
    assert specs["gptb_selective"]["overrides"] == {
        "state_size": 8,
        "state_update": "selective",
        "state_retain_init": 1.0,
        "state_gate_bias": 0.0,
    }
    assert specs["gptb_norebias"]["overrides"] == {"state_size": 8, "rebias": False}  # the control: seed's step


def test_sample_efficiency_difference_to_control_is_paired_by_seed():
    from modeling_gptb.experiments.sample_efficiency import _against_control

    def runs_of(losses):
        return [{"seed": seed, "eval_loss": [9.0, loss]} for seed, loss in losses.items()]

    runs = {"gptb_norebias": runs_of({0: 5.0, 1: 6.0}), "gptb_x": runs_of({1: 5.5, 0: 5.1}), "gpt2_ctx64": []}
    line = _against_control(runs)  # differences 0.1 (seed 0) and -0.5 (seed 1): mean -0.2, s.d. 0.424
    expected = "-0.200 ± 0.424 nats/token (paired by seed; lower in 1/2 seeds)"
    assert line == f"- `gptb_x` minus the control `gptb_norebias`: {expected}"


def test_auroc_perfect_separation_and_chance():
    assert common.auroc([0.1, 0.2, 0.3], [0.7, 0.8, 0.9]) == 1.0
    assert common.auroc([0.7, 0.8, 0.9], [0.1, 0.2, 0.3]) == 0.0
    assert common.auroc([0.5] * 10, [0.5] * 7) == 0.5  # identical scores: ties count half
    rng = np.random.default_rng(0)
    same = rng.normal(size=4000)
    assert abs(common.auroc(same[:2000], same[2000:]) - 0.5) < 0.03
    assert common.auroc([0.0, 1.0], [0.5, 0.5]) == 0.5  # one pair above, one below


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 30).astype(float), rng.integers(1, 6, 25).astype(float)
    pairs = [(1.0 if y > x else 0.5 if y == x else 0.0) for x in a for y in b]
    assert common.auroc(a, b) == pytest.approx(np.mean(pairs))


def test_fpr_at_tpr():
    assert common.fpr_at_tpr([0.1, 0.2, 0.3], [0.7, 0.8, 0.9]) == 0.0
    assert common.fpr_at_tpr([0.7, 0.8, 0.9], [0.1, 0.2, 0.3]) == 1.0
    assert common.fpr_at_tpr([0.5] * 10, [0.5] * 10) == 1.0  # identical scores: nothing separates them
    rng = np.random.default_rng(0)
    same = rng.normal(size=20000)
    assert abs(common.fpr_at_tpr(same[:10000], same[10000:]) - 0.95) < 0.02


def test_roc_curve_ends():
    fpr, tpr = common.roc_curve([0.1, 0.4], [0.35, 0.8])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)


# Issue 21 item 6 / issue 18 item 4: each finished (model, seed) is saved as it ends; a killed run resumes from them.
FIRST_RECORD = {
    "memory": ("runs", "recall_k4", "gptb_residual"),
    "sample_efficiency": ("runs", "gptb"),
    "continual": ("runs", "plain"),
    "novelty": ("per_seed",),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_killed_experiment_keeps_its_finished_runs_and_resumes_from_them(name, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "modeling_gptb.experiments", name, "--preset", "mini", "--out", str(out)]
    command += ["--seeds", "2"] if name == "novelty" else []
    env = {**os.environ, KILL_ENV: "experiment-record-saved"}  # SIGKILL right after the first record is saved
    killed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = sorted((out / "runs").rglob("seed-*.json"))
    assert len(saved) == 1 and not (out / "results.json").exists()
    record = json.loads(saved[0].read_text())["record"]

    assert main(command[3:]) == 0
    result = json.loads((out / "results.json").read_text())
    first = result
    for key in FIRST_RECORD[name]:
        first = first[key]
    assert first[0] == record  # read back, not trained again (its timing would differ)
    assert result["records_read_back"] == 1  # and the report says its wall time is this call's
    assert "min in this call; 1 finished (model, seed) runs read back" in (out / "report.md").read_text()
    records = sorted((out / "runs").rglob("seed-*.json"))
    assert len(records) > 1 and all(json.loads(p.read_text())["record"]["seed"] in (0, 1) for p in records)


# Issue 18: segment GPTB against its no-memory control (every segment from the initial state) and GPT-2.
def test_segments_preset_pairs_segment_gptb_with_its_no_memory_control():
    from modeling_gptb.experiments import sample_efficiency
    from modeling_gptb.experiments.memory import SELECTIVE

    specs = sample_efficiency.variants(sample_efficiency.PRESETS["segments"])
    assert set(specs) == {"gptb", "gptb_seg64", "gptb_seg64_nomem", "gptb_seg64_write", "gpt2_ctx64", "gpt2_ctx256"}
    seg, nomem = specs["gptb_seg64"], specs["gptb_seg64_nomem"]
    assert seg["overrides"] == nomem["overrides"] == {"state_size": 16, "segment_length": 64, **SELECTIVE}
    # the write target: the memory model with one more setting, trained on the same rows
    write = specs["gptb_seg64_write"]
    assert write == {**seg, "overrides": {**seg["overrides"], "state_write_loss": 5.0}}
    without = {k: v for k, v in sample_efficiency.PRESETS["segments"].items() if k != "segment_write_loss"}
    assert "gptb_seg64_write" not in sample_efficiency.variants(without)
    assert "segment_write_loss" in sample_efficiency._MODEL_CHOICE  # adding it keeps the other models' records
    assert specs["gptb"]["overrides"] == {"state_size": 8}  # the seed's one-token step
    # the memory model reads 4 segments per training row and the whole eval block; the control one segment at a time
    assert (seg["block"], seg["context"]) == (256, None) and (nomem["block"], nomem["context"]) == (64, 64)
    # the position evaluation: GPTB's windows do not overlap (one pass; one segment), GPT-2's start every C/2
    assert [specs[n]["stride"] for n in ("gptb_seg64", "gptb_seg64_nomem", "gpt2_ctx64", "gpt2_ctx256")] == [
        None,
        None,
        32,
        128,
    ]
    with pytest.raises(ValueError, match="multiple of segment_length 64"):
        sample_efficiency.variants(
            {**sample_efficiency.PRESETS["segments"], "segment": {"segment_length": 64, "block": 96}}
        )


def test_no_memory_control_reads_every_segment_from_the_initial_state():
    import torch

    from modeling_gptb.tokenization import byte_tokenizer

    torch.manual_seed(0)
    arch = {"n_embd": 32, "n_layer": 2, "n_head": 2}
    model = common.gptb_model(byte_tokenizer(), arch, state_size=2, segment_length=4).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        control = common.window_logits(model, ids, context=4)  # how the control is evaluated
        fresh = model(input_ids=ids[:, 4:8]).logits  # segment 2 alone, from the initial state
        carried = common.window_logits(model, ids)  # the memory model: the state written by segment 1 is read
        trained_rows = model(input_ids=ids.view(-1, 4)).logits.view(2, 12, -1)  # how the control is trained
    torch.testing.assert_close(control[:, 4:8], fresh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained_rows, control, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(carried[:, :4], control[:, :4], rtol=1e-5, atol=1e-5)  # the first segment agrees
    assert (carried[:, 4:8] - fresh).abs().max() > 1e-3  # and the memory changes what follows


def test_segment_section_reports_paired_gaps_at_every_evaluation():
    from modeling_gptb.experiments.sample_efficiency import _segment_section

    def runs_of(curves):
        return [{"seed": seed, "eval_loss": c, "eval_tokens": [0, 100]} for seed, c in curves.items()]

    runs = {
        "gptb_seg8": runs_of({0: [9.0, 5.0], 1: [9.0, 5.2]}),
        "gptb_seg8_nomem": runs_of({1: [9.0, 5.4], 0: [9.0, 4.9]}),
        "gpt2_ctx8": runs_of({0: [9.0, 5.5], 1: [9.0, 5.5]}),
        "gpt2_ctx32": runs_of({0: [9.0, 5.6], 1: [9.0, 5.4]}),
    }
    flops = {name: {"train_flops_per_token": 2.0 if name == "gptb_seg8" else 1.0} for name in runs}
    text = _segment_section({"runs": runs, "summary": flops})
    # at 100 tokens: seg - nomem = +0.1 (seed 0), -0.2 (seed 1): mean -0.05, s.d. 0.212, lower in 1 of 2 seeds
    assert "| 100 | -0.050 ± 0.212 (1/2) | -0.400 ± 0.141 (2/2) | 0.000 ± 0.141 (1/2) |" in text
    assert "seed 0: +0.1000, seed 1: -0.2000" in text and "`gpt2_ctx8` 2.00x" in text
    runs["gptb"] = runs_of({1: [9.0, 5.0]})  # the one-token model, one seed: paired with that seed only
    text = _segment_section({"runs": runs, "summary": flops})
    assert "| 100 | -0.050 ± 0.212 (1/2) | -0.400 ± 0.141 (2/2) | 0.000 ± 0.141 (1/2) | -0.500 ± 0.000 (1/1) |" in text
    # the write-target model is paired with the same no-memory control
    runs["gptb_seg8_write"] = runs_of({0: [9.0, 4.8], 1: [9.0, 5.3]})
    flops["gptb_seg8_write"] = flops["gptb_seg8"]
    text = _segment_section({"runs": runs, "summary": flops})
    assert "### `gptb_seg8_write`" in text and "| `gptb_seg8_write` − `gptb_seg8_nomem` |" in text
    assert "seed 0: -0.1000, seed 1: -0.1000" in text


# Issue 18 item 2: loss by position in long documents. References: one forward per target over exactly the
# context the evaluation promises, in float64.
def _tiny_gpt2(context: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=context)
    return GPT2LMHeadModel(config).double().eval()


def _direct_losses(model, rows, first_of) -> torch.Tensor:
    """Loss of target p (row token p + 1) from a forward over tokens first_of(p)..p alone."""
    t = rows.shape[1] - 1
    out = torch.zeros(rows.shape[0], t, dtype=torch.float64)
    with torch.no_grad():
        for p in range(t):
            logits = model(input_ids=rows[:, first_of(p) : p + 1]).logits[:, -1].double()
            out[:, p] = F.cross_entropy(logits, rows[:, p + 1], reduction="none")
    return out


@pytest.mark.parametrize(("context", "stride"), [(8, 4), (8, 3), (8, 1), (8, 8)])
def test_strided_windows_give_each_position_the_promised_context(context, stride):
    model = _tiny_gpt2(context)
    rows = torch.randint(0, 50, (2, 24))

    def first_of(p):  # the first window holding p: the smallest multiple of stride >= p - context + 1
        return 0 if p < context else -(-(p - context + 1) // stride) * stride

    losses = common.per_token_losses(model, rows, batch_size=1, context=context, stride=stride)
    torch.testing.assert_close(losses.double(), _direct_losses(model, rows, first_of), rtol=1e-6, atol=1e-6)
    if stride == 1:  # the sliding window: every late target from exactly `context` tokens
        assert all(p - first_of(p) + 1 == context for p in range(context, 23))


def test_windowed_evaluation_at_context_at_least_the_document_is_one_forward():
    model = _tiny_gpt2(32)
    rows = torch.randint(0, 50, (3, 21))
    with torch.no_grad():
        logits = model(input_ids=rows[:, :-1]).logits
    full = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
    for context, stride in [(20, 10), (32, 16), (32, None)]:
        windowed = common.per_token_losses(model, rows, batch_size=2, context=context, stride=stride)
        torch.testing.assert_close(windowed.double(), full, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="stride must be between 1 and the context 8"):
        common.window_logits(model, rows, context=8, stride=9)


def test_position_buckets_equal_a_direct_per_position_computation():
    from modeling_gptb.experiments.sample_efficiency import position_losses

    torch.manual_seed(0)
    rows = torch.randint(1, 50, (3, 33))  # within both vocabularies
    position = {"buckets": [0, 4, 12, 32], "resolution": 8}

    def buckets(losses, edges):
        return [sum(losses[d, p].item() for d in range(3) for p in range(a, b)) / (3 * (b - a)) for a, b in edges]

    edges = [(0, 4), (4, 12), (12, 32)]
    fine = [(0, 8), (8, 16), (16, 24), (24, 32)]
    memory = tiny_gptb(segment_length=4)
    gpt2 = _tiny_gpt2(8)
    cases = {  # (model, context, stride, where the direct forward for target p starts)
        "segment GPTB, state carried": (memory, None, None, lambda p: 0),
        "no-memory control, each segment alone": (memory, 4, None, lambda p: p - p % 4),
        "GPT-2, strided windows": (gpt2, 8, 4, lambda p: 0 if p < 8 else -(-(p - 7) // 4) * 4),
    }
    for name, (model, context, stride, first_of) in cases.items():  # per_token_losses scores in float32
        direct = _direct_losses(model, rows, first_of)
        got = position_losses(model, rows, position, 2, context, stride)
        assert got["position_loss"] == pytest.approx(buckets(direct, edges), rel=1e-6, abs=1e-6), name
        assert got["position_curve"] == pytest.approx(buckets(direct, fine), rel=1e-6, abs=1e-6), name
    carried = position_losses(memory, rows, position, 2, None, None)["position_loss"]
    alone = position_losses(memory, rows, position, 2, 4, None)["position_loss"]
    assert carried[0] == pytest.approx(alone[0]) and carried[2] != pytest.approx(alone[2])  # the state matters


def tiny_gptb(**overrides):
    from conftest import tiny_model

    return tiny_model(**overrides).double()


def test_long_documents_start_with_the_separator_and_skip_short_ones():
    from modeling_gptb.experiments.sample_efficiency import long_documents
    from modeling_gptb.tokenization import byte_tokenizer

    tokenizer = byte_tokenizer()
    rows = long_documents(["abcdefgh", "xy", "0123456789"], tokenizer, 6)
    eos = tokenizer.eos_token_id
    assert rows.tolist() == [[eos, *tokenizer("abcdef")["input_ids"]], [eos, *tokenizer("012345")["input_ids"]]]
    with pytest.raises(ValueError, match="no validation document has the position evaluation's 20 tokens"):
        long_documents(["abc", "defgh"], tokenizer, 20)


def test_adding_a_model_keeps_the_other_models_records(tmp_path, monkeypatch):
    from modeling_gptb.experiments import sample_efficiency

    mini = sample_efficiency.PRESETS["mini"]
    base = {**mini, "one_token": False, "gptb_variants": {}, "ablation_state_sizes": [], "norebias_control": False}
    del base["segment"]
    monkeypatch.setitem(sample_efficiency.PRESETS, "mini", base)
    first = sample_efficiency.run("mini", [0], tmp_path)
    assert set(first["runs"]) == {"gpt2_ctx16", "gpt2_ctx32"}
    # the slow one-token model added, for one of two seeds: it trains last, the seed-0 GPT-2 records are read back
    monkeypatch.setitem(sample_efficiency.PRESETS, "mini", {**base, "one_token": True, "one_token_seeds": 1})
    second = sample_efficiency.run("mini", [0, 1], tmp_path)
    assert second["runs"]["gpt2_ctx16"][0] == first["runs"]["gpt2_ctx16"][0]
    assert [r["seed"] for r in second["runs"]["gptb"]] == [0] and second["summary"]["gptb"]["seeds"] == 1
    assert [r["seed"] for r in second["runs"]["gpt2_ctx32"]] == [0, 1]
    report = (tmp_path / "report.md").read_text()
    assert "## Loss by position in long documents" in report and "| gptb | 1 |" in report
    assert (tmp_path / "positions.png").read_bytes()[:4] == b"\x89PNG"


# Issue 19: the outlier-exposure probe of the novelty experiment (the probe and its score: test_outlier_exposure.py).
def test_outlier_exposure_never_fits_on_a_test_set():
    from modeling_gptb.experiments import novelty

    with pytest.raises(ValueError, match="German is a test set"):
        novelty.outlier_texts({**novelty.PRESETS["mini"], "outlier_languages": ["fr", "de"]})
    texts = novelty.outlier_texts(novelty.PRESETS["mini"])
    test_chars = novelty.novel_texts("random-chars", 50)[0]  # the random-character test set's start
    assert "de" not in texts and texts["random-chars"][0][:50] != test_chars


def test_held_out_blocks_spread_over_documents():
    from modeling_gptb.experiments import common, novelty

    texts = ["a" * 100, "short", "b" * 70, "c" * 45]  # byte tokens: 100, 5, 70 and 45 (+ eos each)
    tokenizer = common.make_tokenizer("byte", texts)
    p = {"block": 64, "text_tokens": 16, "blocks_per_document": 2}  # texts of 16 tokens, not the training window
    blocks, used = novelty.held_out_blocks(texts, tokenizer, p, limit=5)
    # two blocks from the first document, none from the too-short second, two from the third, one from the fourth
    assert used == 4 and blocks.shape == (5, 16)
    first_bytes = [tokenizer.decode(row[:1]) for row in blocks]
    assert first_bytes == ["a", "a", "b", "b", "c"]
    blocks, used = novelty.held_out_blocks(texts, tokenizer, p, limit=3)
    assert used == 3 and [tokenizer.decode(row[:1]) for row in blocks] == ["a", "a", "b"]  # stops at the limit
    stream, used = novelty.held_out_blocks(texts, tokenizer, p, limit=5, per_document=None)
    assert used == 4 and torch.equal(stream, common.blocks_of(common.token_stream(texts, tokenizer), 16, 5))
    with pytest.raises(ValueError, match="holds a block of 16 tokens"):
        novelty.held_out_blocks(["tiny"], tokenizer, p, limit=5)


def test_in_domain_held_out_texts_are_never_trained_on():
    from modeling_gptb.experiments import common, novelty

    p = novelty.PRESETS["mini"]
    held_out = novelty.in_domain_held_out_texts(p)
    validation = common.load_texts(p["domain_a"], "validation", p["val_chars"])
    assert held_out[: len(validation)] == validation and len(held_out) > len(validation)
    # the training split in training order: the held-out part starts with the first document that starts at or past
    # the cap; the document cut at the cap (partly trained on) is not in it
    ordered = common.load_texts(p["domain_a"], "train", p["train_chars"] + p["val_chars"])
    starts = np.cumsum([0] + [len(t) for t in ordered[:-1]])
    first_past = int(np.argmax(starts >= p["train_chars"]))
    assert starts[first_past - 1] < p["train_chars"] < starts[first_past - 1] + len(ordered[first_past - 1])
    assert held_out[len(validation) :] == ordered[first_past:]
    trained = "".join(common.load_texts(p["domain_a"], "train", p["train_chars"]))
    assert len(trained) == p["train_chars"] and ordered[first_past - 1][:40] in trained
    assert novelty.in_domain_held_out_texts({**p, "train_chars": None}) == validation
