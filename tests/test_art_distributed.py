"""Two real training processes (torchrun, gloo on CPU) keep identical ART memories: each rank feeds different rows,
and every rank ends with the memory of a single process fed all rows in rank order."""

import os
import subprocess
import sys

import pytest
import torch
from art_distributed_worker import (
    FITTED_TRANSFORMS,
    ROUNDS,
    RULES,
    fitted_and_calibrated,
    new_memory,
    rank_rows,
    transformed_rows,
)
from safetensors import safe_open
from safetensors.torch import load_file

from modeling_gptb.art_memory import ART_MEMORY_FILE, ARTMemory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "art_distributed_worker.py")
WORLD = 2


def test_two_processes_hold_the_memory_of_one_process_fed_in_rank_order(tmp_path):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    # --standalone: a local rendezvous on a free port chosen by the OS.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    result = subprocess.run([*command, WORKER, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    for rule in RULES:
        ranks = [load_file(tmp_path / f"{rule}-rank{rank}.safetensors") for rank in range(WORLD)]
        # The same memory on every rank, bit for bit ...
        for name in ("weight", "category_counts", "num_committed"):
            assert all(torch.equal(ranks[0][name], other[name]) for other in ranks[1:]), (rule, name)
        # ... and it is the memory of one process fed every rank's rows in rank order.
        single = new_memory(rule)
        expected = {rank: [] for rank in range(WORLD)}
        for round_ in range(ROUNDS):
            parts = [rank_rows(rule, rank, round_) for rank in range(WORLD)]
            output = single.update(torch.cat(parts))
            start = 0
            for rank, part in enumerate(parts):
                expected[rank].append(output[start : start + part.shape[0]])
                start += part.shape[0]
        for name, tensor in single.state_dict().items():
            assert torch.equal(ranks[0][name], tensor), (rule, name)
        assert single.num_categories > 3, "the data should exercise several categories"
        # Each rank got back the outputs of its own rows.
        for rank in range(WORLD):
            for field in ("category", "status", "similarity"):
                want = torch.cat([getattr(o, field) for o in expected[rank]])
                assert torch.equal(ranks[rank][field], want), (rule, rank, field)
        # An input invalid on one rank fails on every rank, before anything changes (checked above: the final state
        # is the single process's, which never saw it).
        errors = []
        for rank in range(WORLD):
            with safe_open(tmp_path / f"{rule}-rank{rank}.safetensors", framework="pt") as f:
                errors.append(f.metadata()["error"])
        assert "row 0 holds NaN or Inf" in errors[1] and "invalid input on rank(s) [1]" in errors[0]
        # Only rank 0 wrote its file, and it holds the shared memory.
        assert os.listdir(tmp_path / f"{rule}-saved-rank0") == [ART_MEMORY_FILE]
        assert not os.path.exists(tmp_path / f"{rule}-saved-rank1")
        saved = ARTMemory.from_pretrained(tmp_path / f"{rule}-saved-rank0")
        assert torch.equal(saved.weight, single.weight) and torch.equal(saved.category_counts, single.category_counts)

    for transform in FITTED_TRANSFORMS:
        check_transformed(tmp_path, transform)


def check_transformed(tmp_path, transform):
    """The fitted transform, the calibration and the category descriptions are those of all ranks' rows: the same on
    every rank, and those of one process fed every rank's rows in rank order (the fit's sums up to float64 rounding of
    the all-reduce)."""
    ranks = [load_file(tmp_path / f"{transform}-rank{rank}.safetensors") for rank in range(WORLD)]
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), (transform, name)
    parts = [[transformed_rows(rank, round_) for round_ in range(ROUNDS)] for rank in range(WORLD)]
    single = fitted_and_calibrated(
        *(lambda r, i=i: torch.cat([parts[rank][r][i] for rank in range(WORLD)]) for i in range(3)),
        transform=transform,
    )
    for name, tensor in single.named_buffers():
        if tensor.is_floating_point():
            torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-12, atol=1e-12, msg=(transform, name))
        else:
            assert torch.equal(ranks[0][name], tensor), (transform, name)
    assert single.num_categories > 2 and single.calibration_report()["rows"] > 20
    assert single.calibration_report()["score"] == ("outliers" if transform == "standardize" else "combined")
    if transform == "standardize":  # the per-dimension spread was fitted, the constant column floored
        fitted = torch.cat([parts[rank][0][0] for rank in range(WORLD)])
        deviation = fitted.std(0, correction=0)
        torch.testing.assert_close(ranks[0]["input_dim_scale"][:5], deviation[:5], rtol=1e-12, atol=0)
        floor = 1e-3 * float(deviation.square().mean().sqrt())
        assert deviation[5] == 0 and float(ranks[0]["input_dim_scale"][5]) == pytest.approx(floor, rel=1e-12)
