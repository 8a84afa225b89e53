"""One rank of `test_art_distributed.py`, started by `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank feeds its own rows (a different number per rank) to the same memories for a few rounds, then tries an input
that is invalid on rank 1 only, saves with the default `is_main_process`, and writes its final state and outputs to
`<out>/<rule>-rank<r>.safetensors` for the test to compare. Then a memory of each fitted transform (`euclidean`,
`standardize`, with the outlier probe) is fitted, fed with exemplars and calibrated on each rank's own rows
(`<out>/<transform>-rank<r>.safetensors`).
"""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from modeling_gptb.art_memory import ARTMemory

RULES = {"cosine": {"vigilance": 0.8, "beta": 0.3}, "fuzzy": {"vigilance": 0.75, "beta": 0.5}}
DIM, ROUNDS, CAPACITY = 6, 3, 24
FITTED_TRANSFORMS = ("euclidean", "standardize")
# Per-dimension spreads for the fitted memories: "standardize" has something to undo, and its floor a constant column.
COLUMN_SCALES = torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 0.0], dtype=torch.float64)


def rank_rows(rule: str, rank: int, round_: int) -> torch.Tensor:
    """The rows rank `rank` feeds in round `round_`: a different count per rank and round, some ranks none."""
    n = (5 + 9 * rank + 4 * round_) if (rank, round_) != (1, 1) else 0
    g = torch.Generator().manual_seed(1000 * rank + round_)
    centers = torch.randn(4, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rows = centers[torch.randint(0, 4, (n,), generator=g)] + 0.5 * torch.randn(n, DIM, generator=g)
    return torch.sigmoid(rows) if rule == "fuzzy" else rows


def new_memory(rule: str) -> ARTMemory:
    return ARTMemory(DIM, rule=rule, max_categories=CAPACITY, dtype=torch.float64, **RULES[rule])


def fitted_and_calibrated(rows_of, surprise_of, exemplars_of, transform: str) -> ARTMemory:
    """A memory of a fitted `transform`, fitted on, fed and calibrated with the given rows (a rank's, or all ranks' in
    order)."""
    memory = ARTMemory(DIM, vigilance=0.99, max_categories=CAPACITY, input_transform=transform, dtype=torch.float64)
    memory.fit_input_transform(rows_of(0))
    memory.update(rows_of(1), exemplars=exemplars_of(1))
    if transform == "standardize":  # and the outlier probe, against shifted rows (rank 1 has none in round 1)
        memory.fit_outlier_exposure(rows_of(0), rows_of(1) + 2.0)
    memory.calibrate(rows_of(2), fpr=0.2, surprise=surprise_of(2))  # "outliers" where the probe is fitted
    return memory


def transformed_rows(rank: int, round_: int):
    """Rows, surprise and exemplars of a rank for the transformed memory (round 1 of rank 1 is empty)."""
    rows = rank_rows("cosine", rank, round_) * 3 * COLUMN_SCALES + 1
    n = rows.shape[0]
    surprise = torch.arange(n, dtype=torch.float64) / 7 + rank
    exemplars = torch.arange(n * 3).view(n, 3) + 100 * rank
    return rows, surprise, exemplars


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for rule in RULES:
        memory = new_memory(rule)
        outputs = [memory.update(rank_rows(rule, rank, round_)) for round_ in range(ROUNDS)]
        bad = rank_rows(rule, rank, 0)
        if rank == 1:
            bad[0, 0] = float("nan")
        try:
            memory.update(bad)
            error = ""
        except ValueError as exc:
            error = str(exc)
        memory.save_pretrained(os.path.join(out, f"{rule}-saved-rank{rank}"))  # only rank 0 writes
        tensors = {name: tensor.contiguous() for name, tensor in memory.state_dict().items()}
        for name in ("category", "status", "similarity"):
            tensors[name] = torch.cat([getattr(o, name) for o in outputs])
        save_file(tensors, os.path.join(out, f"{rule}-rank{rank}.safetensors"), metadata={"error": error})
    mine = [transformed_rows(rank, round_) for round_ in range(ROUNDS)]
    for transform in FITTED_TRANSFORMS:
        memory = fitted_and_calibrated(*(lambda r, i=i: mine[r][i] for i in range(3)), transform=transform)
        save_file(dict(memory.named_buffers()), os.path.join(out, f"{transform}-rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
