"""Smoke test of `gptb bench`: every section runs at tiny sizes and writes its table and JSON.

No timing is asserted (speed lives in the benchmarks: docs/design.md#how-speed-is-measured); this keeps their code
from rotting.
"""

import json

import pytest
import torch

from modeling_gptb.benchmarks.__main__ import SECTIONS, main

ROW_KEYS = {"measure", "value", "baseline", "ratio", "goal", "met"}


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_section_runs_at_tiny_sizes(tmp_path, keep_threads, capsys):
    json_path, markdown_path = tmp_path / "gptb-bench-cpu.json", tmp_path / "gptb-bench-cpu.md"
    assert main(["--size", "tiny", "--device", "cpu", "--output", str(tmp_path)]) == 0

    result = json.loads(json_path.read_text())
    assert result["device"] == "cpu" and result["sizes"]["name"] == "tiny"
    assert {"platform", "torch", "threads"} <= set(result["machine"])
    assert list(result["sections"]) == list(SECTIONS)
    for name, section in result["sections"].items():
        assert section["rows"], name
        for entry in section["rows"]:
            assert set(entry) == ROW_KEYS, name
            assert entry["met"] in (True, False, None)
        assert isinstance(section["data"], dict)

    step = result["sections"]["step"]["data"]
    for mode in ("inference", "training"):
        assert step[mode]["seconds"] > 0 and step[mode]["baseline_seconds"] > 0 and step[mode]["mfu"] > 0
    art = result["sections"]["art"]["data"]
    for rule in ("cosine", "fuzzy"):
        assert art[rule]["identical_decisions"], f"{rule}: ARTMemory disagrees with the one-at-a-time reference"
        assert art[rule]["max_prototype_difference"] < 1e-9
        assert art[rule]["resonated"] > 0 and art[rule]["categories_after"] > art[rule]["categories_before"]
    generate = result["sections"]["generate"]["data"]
    assert generate["state_bytes"]["computed"] == generate["state_bytes"]["measured"]
    assert result["sections"]["trainer"]["data"]["tokens_per_s"]["trainer"] > 0

    table = markdown_path.read_text()
    assert table.startswith("Machine: ")
    assert "| Section | Measure | GPTB / ours | Baseline | Ratio | Goal | Met |" in table
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Section")]
    assert len(lines) == sum(len(section["rows"]) for section in result["sections"].values())
    assert table in capsys.readouterr().out


def test_gptb_bench_writes_into_the_current_directory(tmp_path, keep_threads, monkeypatch):
    from modeling_gptb.cli import main as gptb

    monkeypatch.chdir(tmp_path)
    assert gptb(["bench", "--size", "tiny", "--device", "cpu", "--only", "matmul"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gptb-bench-cpu.json", "gptb-bench-cpu.md"]
    assert list(json.loads((tmp_path / "gptb-bench-cpu.json").read_text())["sections"]) == ["matmul"]


def test_bench_help_names_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: gptb bench")


def test_unknown_section_is_an_error(capsys):
    assert main(["--size", "tiny", "--only", "nope"]) == 2
    assert "unknown section" in capsys.readouterr().err
