"""The memory benchmark (issue 13 item 1): its task generators, held-out split, short-context windows and baselines."""

import json
import re

import pytest
import torch

from modeling_gptb import GPTBConfig
from modeling_gptb.experiments import memory
from modeling_gptb.experiments.__main__ import main
from modeling_gptb.experiments.memory_tasks import (
    DISTRACTORS,
    GO,
    IGNORE,
    KEYS,
    NOISE,
    QUERY,
    TEST_SEED_BASE,
    VALIDATION_SEED_BASE,
    VALUES,
    VOCAB_SIZE,
    held_out_set,
    make_batch,
    train_generator,
    validation_set,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_recall_asks_for_the_one_value_after_exactly_distance_distractors():
    batch = make_batch("recall", 200, generator(), distance=10)
    assert batch.inputs.shape == (200, 24)
    key_positions = set()
    for inputs, targets in zip(batch.inputs, batch.targets, strict=True):
        (query,) = (inputs == QUERY).nonzero()[:, 0].tolist()
        (key_at,) = (inputs[:query] < VALUES).nonzero()[:, 0].tolist()  # one value before the query
        (scored,) = (targets != IGNORE).nonzero()[:, 0].tolist()
        key = int(inputs[key_at])
        assert scored == query == key_at + 10 + 1 and targets[query] == key and inputs[query + 1] == key
        others = torch.cat([inputs[:key_at], inputs[key_at + 1 : query], inputs[query + 2 :]])
        assert all(int(t) in DISTRACTORS for t in others)
        key_positions.add(key_at)
    assert key_positions == set(range(11))  # the key's position is uniform over [0, distance]


def test_mqar_scores_each_repeated_key_with_its_value():
    batch = make_batch("mqar", 50, generator(1), pairs=4)
    assert batch.inputs.shape == (50, 16)
    for inputs, targets in zip(batch.inputs, batch.targets, strict=True):
        keys, values = inputs[:8:2], inputs[1:8:2]
        assert len(set(keys.tolist())) == 4 and all(k in KEYS for k in keys.tolist())
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        asked = inputs[8::2]
        assert sorted(asked.tolist()) == sorted(keys.tolist())
        assert targets[8::2].tolist() == [pairs[k] for k in asked.tolist()] == inputs[9::2].tolist()
        assert (targets[:8] == IGNORE).all() and (targets[9::2] == IGNORE).all()


def test_mqar_gap_puts_distractors_between_the_pairs_and_the_queries():
    batch = make_batch("mqar", 50, generator(1), pairs=3, gap=5)
    assert batch.inputs.shape == (50, 17)
    for inputs, targets in zip(batch.inputs, batch.targets, strict=True):
        pairs = dict(zip(inputs[:6:2].tolist(), inputs[1:6:2].tolist(), strict=True))
        assert len(pairs) == 3 and all(k in KEYS for k in pairs) and all(v < VALUES for v in pairs.values())
        assert all(int(t) in DISTRACTORS for t in inputs[6:11])
        asked = inputs[11::2].tolist()
        assert sorted(asked) == sorted(pairs)
        assert targets[11::2].tolist() == [pairs[k] for k in asked] == inputs[12::2].tolist()
        assert (targets[:11] == IGNORE).all() and (targets[12::2] == IGNORE).all()
    plain, gapless = make_batch("mqar", 8, generator(2), pairs=3), make_batch("mqar", 8, generator(2), pairs=3, gap=0)
    assert torch.equal(plain.inputs, gapless.inputs) and torch.equal(plain.targets, gapless.targets)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"mqar needs an integer gap >= 0, got {bad!r}"):
            make_batch("mqar", 2, generator(), pairs=2, gap=bad)


def test_selective_copy_asks_for_the_values_in_order():
    batch = make_batch("selective_copy", 30, generator(2), length=12, count=3)
    for inputs, targets in zip(batch.inputs, batch.targets, strict=True):
        data = inputs[:12][inputs[:12] != NOISE]
        assert len(data) == 3 and (inputs[12:] == GO).all()
        assert targets[12:].tolist() == data.tolist() and (targets[:12] == IGNORE).all()


def test_parity_targets_are_running_parities():
    batch = make_batch("parity", 20, generator(3), length=9)
    for bits, targets in zip(batch.inputs, batch.targets, strict=True):
        assert targets.tolist() == [sum(bits[: t + 1].tolist()) % 2 for t in range(9)]


def test_held_out_sequences_come_from_seeds_training_never_uses():
    for seed in (TEST_SEED_BASE, VALIDATION_SEED_BASE, -1):
        with pytest.raises(ValueError, match=r"training seeds must be in \[0, 500000\)"):
            train_generator(seed)
    test = held_out_set("recall", 256, 0, distance=32)
    validation = validation_set("recall", 256, 0, distance=32)
    train = make_batch("recall", 256, train_generator(0), distance=32)
    for one, other in ((test, train), (validation, train), (test, validation)):
        assert not any(torch.equal(row, row2) for row in one.inputs for row2 in other.inputs)
    assert torch.equal(test.inputs, held_out_set("recall", 256, 0, distance=32).inputs)  # the same for every model


def test_unknown_task_and_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="unknown task 'copy'"):
        make_batch("copy", 2, generator())
    with pytest.raises(ValueError, match="mqar needs 1 <= pairs <= 16"):
        make_batch("mqar", 2, generator(), pairs=17)


def test_short_context_sees_only_the_last_tokens_before_each_scored_step():
    p = memory.PRESETS["mini"]
    model = memory.build_model({"kind": "gpt2", "context": 8}, p, 12).eval()
    batch = make_batch("mqar", 3, generator(4), pairs=4)  # 16 tokens, scored at 8, 10, 12, 14
    with torch.no_grad():
        windowed = memory.scored_logits(model, batch.inputs, batch.targets, context=8)
        expected = [
            model(input_ids=batch.inputs[row : row + 1, t - 7 : t + 1]).logits[0, -1]
            for row in range(3)
            for t in (8, 10, 12, 14)
        ]
    torch.testing.assert_close(windowed, torch.stack(expected))


def test_lstm_baseline_matches_gptb_parameters():
    p = memory.PRESETS["cpu"]
    gptb = memory.build_model({"kind": "gptb"}, p, 69)
    lstm = memory.build_model({"kind": "lstm"}, p, 69)
    n_gptb, n_lstm = (sum(t.numel() for t in m.parameters()) for m in (gptb, lstm))
    assert abs(n_lstm - n_gptb) / n_gptb < 0.02


def test_accuracy_counts_top_tokens_at_scored_steps():
    batch = make_batch("mqar", 8, generator(5), pairs=2)

    class Oracle(torch.nn.Module):
        """Looks each repeated key up among the pairs; answers right for odd values, one too high for even ones."""

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, VOCAB_SIZE)
            for row, inputs in enumerate(input_ids):
                pairs = dict(zip(inputs[:4:2].tolist(), inputs[1:4:2].tolist(), strict=True))
                for t in (4, 6):
                    value = pairs[int(inputs[t])]
                    logits[row, t, value if value % 2 else value + 1] = 1.0
            return memory.CausalLMOutput(logits=logits)

    scored = batch.targets[batch.targets != IGNORE]
    expected = float((scored % 2 == 1).float().mean())
    assert 0 < expected < 1 and memory.accuracy(Oracle(), batch, None, batch_size=3) == expected


def test_curriculum_splits_the_run_into_equal_parts_in_order():
    curriculum = {"distance": [1, 2, 4]}
    stages = [memory.curriculum_stage(curriculum, step, 10)["distance"] for step in range(10)]
    assert stages == [1, 1, 1, 1, 2, 2, 2, 4, 4, 4]  # step * 3 // 10
    assert memory.curriculum_stage(None, 5, 10) == {} and memory.curriculum_stage({}, 5, 10) == {}


def test_training_follows_the_curriculum_and_tests_at_the_task_distance(monkeypatch):
    p = {**memory.PRESETS["mini"], "steps": 4, "eval_every": 4}
    seen = []
    real = memory.make_batch

    def recording(task, n, generator, **params):
        seen.append(params["distance"])
        return real(task, n, generator, **params)

    monkeypatch.setattr(memory, "make_batch", recording)
    task = {"task": "recall", "params": {"distance": 4}, "loss": "query", "curriculum": {"distance": [1, 2]}}
    test = memory.held_out_set("recall", 8, 0, distance=4)
    record = memory.train_one(task, {"kind": "gptb"}, p, 0, test)
    assert seen == [1, 1, 2, 2] and len(record["accuracy"]) == 2

    seen.clear()  # a task's own budget: 6 steps (curriculum over those), accuracy at 0, 3, 6
    record = memory.train_one({**task, "steps": 6, "eval_every": 3}, {"kind": "gptb"}, p, 0, test)
    assert seen == [1, 1, 1, 2, 2, 2] and record["eval_step"] == [0, 3, 6]


def test_mini_run_reports_every_task_and_a_loadable_best_config(tmp_path):
    assert main(["memory", "--preset", "mini", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["runs"]) == set(memory.PRESETS["mini"]["tasks"])
    assert "gpt2_ctx8" in data["runs"]["recall_k4"] and "gpt2_ctx8" not in data["runs"]["mqar_2"]  # 8 tokens
    for by_model in data["summary"].values():
        for values in by_model.values():
            assert 0.0 <= values["final_accuracy_mean"] <= 1.0 and values["seeds"] == 1
    assert data["best_model"] in {"gptb_gated", "gptb_replace"}
    config = GPTBConfig(**data["best_config"])
    assert config.n_embd == 16 and config.state_update in ("gated", "replace")


def test_a_variant_is_recommended_only_when_it_beats_the_seeds_update():
    tasks = {"a": {"loss": "query"}, "b": {"loss": "query"}, "lm": {"loss": "lm"}}
    models = {"gptb_gated": {"kind": "gptb"}, "gptb_replace": {"kind": "gptb"}, "gpt2_full": {"kind": "gpt2"}}

    def summary(gated, replace):
        return {
            t: {
                "gptb_gated": {"final_accuracy_mean": gated[i], "solved_seeds": 3 * (gated[i] >= 0.95), "seeds": 3},
                "gptb_replace": {
                    "final_accuracy_mean": replace[i],
                    "solved_seeds": 3 * (replace[i] >= 0.95),
                    "seeds": 3,
                },
                "gpt2_full": {"final_accuracy_mean": 1.0, "solved_seeds": 3, "seeds": 3},
            }
            for i, t in enumerate(tasks)
        }

    assert memory.best_gptb(summary([0.09, 0.07, 1.0], [0.06, 0.07, 0.0]), tasks, models) == "gptb_replace"  # noise
    assert memory.best_gptb(summary([0.4, 0.3, 0.0], [0.06, 0.07, 1.0]), tasks, models) == "gptb_gated"  # by margin
    assert memory.best_gptb(summary([1.0, 0.1, 0.0], [0.9, 0.9, 0.0]), tasks, models) == "gptb_gated"  # solves more


def test_runs_of_different_tasks_combine_into_one_result(tmp_path, monkeypatch):
    memory.run("mini", [0], tmp_path / "a", tasks=["parity_4"], models=["gptb_replace", "lstm"])
    memory.run("mini", [0], tmp_path / "b", tasks=["mqar_2"], models=["gptb_replace", "lstm"])
    combined = memory.combine([tmp_path / "a", tmp_path / "b"], tmp_path / "all")
    assert set(combined["runs"]) == {"parity_4", "mqar_2"} == set(combined["summary"])
    saved = json.loads((tmp_path / "all" / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(combined["runs"])) and saved["best_model"] == "gptb_replace"
    assert (tmp_path / "all" / "memory.png").exists() and "parity_4" in (tmp_path / "all" / "report.md").read_text()
    # the time is the parts' sum, said as such; the machine is the one the parts ran on, not the combining process's
    parts = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("a", "b")]
    with monkeypatch.context() as patch:
        patch.setattr(memory.common, "machine", lambda: {"the combining process": True})
        again = memory.combine([tmp_path / "a", tmp_path / "b"], tmp_path / "again")
    report = (tmp_path / "again" / "report.md").read_text()
    assert "summed over the 2 runs combined" in report and "Wall time" not in report
    assert again["combined_parts"] == 2 and again["machine"] == parts[0]["machine"]
    assert json.dumps(parts[0]["machine"]) in report and "the combining process" not in report
    assert again["elapsed_s"] >= sum(part["elapsed_s"] for part in parts)
    memory.run("mini", [0, 1], tmp_path / "c", tasks=["parity_4"], models=["gpt2_full"])  # other models and seeds
    merged = memory.combine([tmp_path / "a", tmp_path / "c"], tmp_path / "merged")
    assert set(merged["runs"]["parity_4"]) == {"gptb_replace", "lstm", "gpt2_full"} and merged["seeds"] == [0, 1]
    assert (
        merged["summary"]["parity_4"]["gpt2_full"]["seeds"] == 2
        and merged["summary"]["parity_4"]["lstm"]["seeds"] == 1
    )
    other = json.loads((tmp_path / "a" / "results.json").read_text())
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.json").write_text(json.dumps({**other, "preset": "cpu"}))
    with pytest.raises(ValueError, match="different presets"):
        memory.combine([tmp_path / "a", tmp_path / "e"], tmp_path / "bad")
    with pytest.raises(ValueError, match="again"):
        memory.combine([tmp_path / "a", tmp_path / "a"], tmp_path / "twice")
    memory.run("mini", [1], tmp_path / "f", tasks=["parity_4"], models=["lstm"])  # another seed of a pair
    seeds = memory.combine([tmp_path / "a", tmp_path / "f"], tmp_path / "seeds")["runs"]["parity_4"]["lstm"]
    assert [record["seed"] for record in seeds] == [0, 1]


def test_report_names_a_tasks_own_budget_and_the_seconds_per_step(tmp_path, monkeypatch):
    mini = memory.PRESETS["mini"]
    tasks = {"parity_4": {**mini["tasks"]["parity_4"], "steps": 2, "eval_every": 1}, "mqar_2": mini["tasks"]["mqar_2"]}
    monkeypatch.setitem(memory.PRESETS, "mini", {**mini, "tasks": tasks})
    result = memory.run("mini", [0], tmp_path, models=["lstm"])
    assert [len(result["runs"][t]["lstm"][0]["accuracy"]) for t in tasks] == [3, 3]  # steps 0, 1, 2 and 0, 2, 3
    report = (tmp_path / "report.md").read_text()
    assert "batch 8, 3 steps (`parity_4` 2), lr" in report
    seconds = report.split("## Seconds per training step")[1].split("##")[0]
    for task in tasks:
        assert re.search(rf"\| {task} \| \d+\.\d{{3}} \|", seconds), seconds


def test_report_cells_show_a_spread_only_over_several_seeds():
    one = {"seeds": 1, "final_accuracy_mean": 0.5678, "final_accuracy_std": 0.0}
    three = {"seeds": 3, "final_accuracy_mean": 0.5678, "final_accuracy_std": 0.0123}
    assert memory._accuracy_cell(one) == "0.57" and memory._accuracy_cell(three) == "0.57 ± 0.01"


# Issue 18 item 3: recall across segments, without a curriculum, against segment GPTB's no-memory control.
def _recalled_positions(task: str, inputs: torch.Tensor, targets: torch.Tensor) -> list[list[int]]:
    """Per row, where the tokens its scored steps must recall sit, found from the sequence itself."""
    rows = []
    for row, target in zip(inputs, targets, strict=True):
        scored = (target != IGNORE).nonzero()[:, 0]
        if task == "recall":  # the one value before the query
            rows.append((row[: int(scored[0])] < VALUES).nonzero()[:, 0].tolist())
        elif task == "mqar":  # each asked key where it was first given, and the value after it
            firsts = [int((row == row[t]).nonzero()[0, 0]) for t in scored.tolist()]
            assert all(int(row[f + 1]) == int(target[t]) for f, t in zip(firsts, scored.tolist(), strict=True))
            rows.append(sorted(firsts + [f + 1 for f in firsts]))
        else:  # selective_copy: the values among the NOISE before the first GO
            rows.append((row[: int(scored[0])] != NOISE).nonzero()[:, 0].tolist())
    return rows


@pytest.mark.parametrize("preset", ["segments", "segments_gpu"])
def test_segments_presets_put_what_every_query_recalls_in_earlier_segments(preset):
    p = memory.PRESETS[preset]
    (k,) = {
        spec["overrides"]["segment_length"]
        for spec in p["models"].values()
        if "segment_length" in spec.get("overrides", {})
    }
    tasks = p["tasks"]
    assert [spec["task"] for spec in tasks.values()] == ["recall", "recall", "mqar", "selective_copy"]
    assert [spec["loss"] for spec in tasks.values()] == ["query", "lm", "query", "query"]
    for index, (name, spec) in enumerate(tasks.items()):
        assert "curriculum" not in spec, name
        for batch in (
            held_out_set(spec["task"], 1024, index, **spec["params"]),
            make_batch(spec["task"], 256, generator(), **spec["params"]),
        ):
            recalled = _recalled_positions(spec["task"], batch.inputs, batch.targets)
            last = (batch.inputs.shape[1] - 1) // k
            for positions, target in zip(recalled, batch.targets, strict=True):
                scored = (target != IGNORE).nonzero()[:, 0]
                back = 1 if spec["task"] == "selective_copy" else 2  # recall and MQAR: >= 2 segment boundaries
                assert positions and min(scored.tolist()) // k - max(positions) // k >= back, name
                if spec["task"] != "recall":  # the queries and the copy: all in the last segment
                    assert {t // k for t in scored.tolist()} == {last}, name
            segments = {position // k for positions in recalled for position in positions}
            first = [positions[0] for positions in recalled]
            if spec["task"] == "recall":  # the key at a random position, the whole range used
                assert min(first) == 0 and max(first) == spec["params"]["distance"], name
            if spec["task"] == "selective_copy":  # the values spread over both earlier segments
                assert segments == set(range(last)), name
    with pytest.raises(ValueError, match="9 pairs and 4 values must each fit one segment of 16 tokens"):
        memory._across_segments(16, pairs=9, count=4)


def test_no_memory_control_scores_each_segment_from_the_initial_state():
    p = memory.PRESETS["segments"]
    spec = p["models"]["gptb_seg16_nomem"]
    assert spec["overrides"] == p["models"]["gptb_seg16_selective"]["overrides"] and spec["reset_every"] == 16
    torch.manual_seed(0)
    model = memory.build_model(spec, p, 68).eval()
    batch = make_batch("recall", 4, generator(1), distance=32)
    with torch.no_grad():
        for weight in model.parameters():  # the selective write starts closed; open everything at random
            weight.add_(torch.randn_like(weight) * 0.1)
        control = memory.scored_logits(model, batch.inputs, batch.targets, None, reset=16)
        carried = memory.scored_logits(model, batch.inputs, batch.targets, None)
        query_at = (batch.inputs == QUERY).nonzero(as_tuple=True)[1].tolist()
        fresh = torch.stack(
            [
                model(input_ids=batch.inputs[row : row + 1, q - q % 16 : q + 1]).logits[0, -1]
                for row, q in enumerate(query_at)
            ]
        )  # the query's segment alone, from the initial state
    torch.testing.assert_close(control, fresh, rtol=1e-5, atol=1e-5)
    assert (carried - fresh).abs().max() > 1e-3  # the memory model reads what earlier segments wrote


def _key_gradient(model, batch, reset=None) -> torch.Tensor:
    """Per row, the norm of the query loss's gradient with respect to the key token's input embedding."""
    embedded = {}

    def keep(module, args, output):
        output.retain_grad()
        embedded["x"] = output

    hook = model.get_input_embeddings().register_forward_hook(keep)
    try:
        logits = memory.scored_logits(model, batch.inputs, batch.targets, None, reset)
    finally:
        hook.remove()
    model.zero_grad()
    torch.nn.functional.cross_entropy(logits, batch.targets[batch.targets != IGNORE]).backward()
    rows, query_at = (batch.inputs == QUERY).nonzero(as_tuple=True)
    grad = embedded["x"].grad.reshape(
        len(batch.inputs), -1, embedded["x"].shape[-1]
    )  # segments read as rows: rejoined
    return grad[rows, query_at - 32 - 1].norm(dim=-1)


def test_query_loss_reaches_the_key_through_two_segment_steps():
    p = memory.PRESETS["segments"]
    batch = make_batch("recall", 8, generator(3), distance=32)  # every key >= 2 segments before its query
    for name in ("gptb_seg16_replace", "gptb_seg16_selective", "gptb_seg16_nomem"):
        spec = p["models"][name]
        torch.manual_seed(0)
        model = memory.build_model(spec, p, 68).train()
        at_init = _key_gradient(model, batch, spec.get("reset_every"))
        torch.optim.Adam(model.parameters(), lr=1e-3).step()  # one training step on that gradient
        after_a_step = _key_gradient(model, batch, spec.get("reset_every"))
        if name == "gptb_seg16_nomem":  # every segment from the initial state: nothing crosses a boundary
            assert (at_init == 0).all() and (after_a_step == 0).all()
        elif name == "gptb_seg16_selective":  # the write starts at zero (W_w = 0, b_w = 0) and a = 1 drops U
            assert (at_init == 0).all() and (after_a_step > 0).all()
        else:  # the seed's step: the write slots are the next state
            assert (at_init > 0).all() and (after_a_step > 0).all()


def test_no_memory_control_trains_under_both_losses_and_is_never_recommended():
    p = {**memory.PRESETS["segments"], "steps": 2, "eval_every": 1, "test_size": 8, "batch": 4, "eval_batch": 8}
    spec = p["models"]["gptb_seg16_nomem"]
    for task in p["tasks"].values():
        task = {**task, "steps": 2, "eval_every": 1}  # over a task's own budget
        test = held_out_set(task["task"], 8, 0, **task["params"])
        record = memory.train_one(task, spec, p, 0, test)
        assert len(record["accuracy"]) == 3 and record["config"]["segment_length"] == 16
    summary = {
        name: {"final_accuracy_mean": 1.0 if name.endswith("nomem") else 0.1, "solved_seeds": 0, "seeds": 3}
        for name in p["models"]
    }
    tasks = {"recall_k32": p["tasks"]["recall_k32"]}
    assert memory.best_gptb({"recall_k32": summary}, tasks, p["models"]) != "gptb_seg16_nomem"


def test_write_target_model_adds_its_weighted_term_and_trains_at_its_own_lr(tmp_path):
    p = {**memory.PRESETS["segments"], "steps": 2, "eval_every": 1, "test_size": 8, "batch": 4, "eval_batch": 8}
    spec = p["models"]["gptb_seg16_write"]
    assert spec["overrides"] == {**p["models"]["gptb_seg16_selective"]["overrides"], "state_write_loss": 5.0}
    torch.manual_seed(0)
    model = memory.build_model(spec, p, 68).train()
    batch = make_batch("recall", 4, generator(2), distance=32)
    out = model(input_ids=batch.inputs)
    assert out.state_write_loss > 0
    scored = out.logits[batch.targets != IGNORE]
    query = torch.nn.functional.cross_entropy(scored, batch.targets[batch.targets != IGNORE])
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB_SIZE), batch.inputs[:, 1:].flatten())
    for loss, task_part in (("query", query), ("lm", lm)):
        expected = task_part + 5.0 * out.state_write_loss
        torch.testing.assert_close(memory.task_loss(model, batch, loss, None), expected, rtol=1e-6, atol=1e-6)
    task = {**p["tasks"]["recall_k32"], "steps": 2, "eval_every": 1}
    test = held_out_set(task["task"], 8, 0, **task["params"])
    assert memory.train_one(task, spec, p, 0, test)["lr"] == 3e-3
    assert memory.train_one(task, p["models"]["gpt2_full_lr3e-3"], p, 0, test)["lr"] == 3e-3
    assert memory.train_one(task, p["models"]["gpt2_full"], p, 0, test)["lr"] == p["train"]["lr"]


def test_segments_long_reuses_the_recall_tasks_and_their_held_out_sets():
    long, short = memory.PRESETS["segments_long"], memory.PRESETS["segments"]
    assert list(long["tasks"]) == list(short["tasks"])[:2] == ["recall_k32", "recall_k32_lm"]
    assert long["steps"] == 2 * short["steps"]
    for index, name in enumerate(long["tasks"]):  # a task's held-out set is drawn from its index in the preset
        assert long["tasks"][name] == short["tasks"][name] and list(short["tasks"]).index(name) == index
    assert long["models"]["gptb_seg16_write"] == short["models"]["gptb_seg16_write"]
