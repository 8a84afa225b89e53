"""Synthetic memory tasks: seeded generators of token sequences with the positions to score marked.

Every task shares one small vocabulary (`VOCAB_SIZE` tokens) and returns a `TaskBatch`: `inputs` (n, T) and
`targets` (n, T), where `targets[i, t]` is the token the model's output at step t must predict and -100 where step t
is not scored. The answer to a query also follows it in `inputs`, so the same sequences train with the loss at the
scored positions only or with the full language-modelling loss.

- `recall`: `j` distractors, key, exactly `distance` distractors, QUERY, key, filler. The key is one of 16 values,
  the distractors come from 16 other tokens, so the model must write the one value it sees and keep it; `j` is
  uniform in [0, distance], so the key's position varies as much as the distance it must be kept over. Chance: 1/16.
- `mqar`: multi-query associative recall (Zoology, Based, Mamba): `pairs` distinct keys each followed by a value,
  then every key again in random order, each followed by its value; scored at each repeated key. `gap` recall
  distractors between the pairs and the queries put them in different segments of a segment GPTB. Chance: 1/16.
- `selective_copy`: `count` values at random positions of `length` NOISE tokens, then `count` GO tokens; scored at
  each GO, which must give the values in order. Chance: 1/16.
- `parity`: `length` random bits; scored at every step with the parity of the bits so far. Chance: 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VALUES = 16  # token ids 0..15: what is remembered (and the distractors); bits are 0 and 1
KEYS = range(16, 32)  # MQAR keys
NOISE, QUERY, GO = 32, 33, 34
DISTRACTORS = range(35, 51)  # recall's distractors
VOCAB_SIZE = 51
IGNORE = -100

# Held-out sequences come from generators seeded at or above TEST_SEED_BASE, the validation sequences that choices
# (a variant, a budget) may be tuned on from VALIDATION_SEED_BASE up; training seeds stay below both.
VALIDATION_SEED_BASE = 500_000
TEST_SEED_BASE = 1_000_000


@dataclass
class TaskBatch:
    inputs: torch.LongTensor  # (n, T)
    targets: torch.LongTensor  # (n, T): token to predict at each step, IGNORE where not scored


def _values(n: int, length: int, generator: torch.Generator) -> torch.LongTensor:
    return torch.randint(0, VALUES, (n, length), generator=generator)


def recall(n: int, generator: torch.Generator, distance: int) -> TaskBatch:
    """[j distractors, key, `distance` distractors, QUERY, key, filler]: 2·distance + 4 tokens, scored at QUERY."""
    length = 2 * distance + 4
    inputs = torch.randint(DISTRACTORS.start, DISTRACTORS.stop, (n, length), generator=generator)
    key_at = torch.randint(0, distance + 1, (n,), generator=generator)
    query_at = key_at + distance + 1
    rows = torch.arange(n)
    keys = torch.randint(0, VALUES, (n,), generator=generator)
    inputs[rows, key_at] = keys
    inputs[rows, query_at] = QUERY
    inputs[rows, query_at + 1] = keys
    targets = torch.full_like(inputs, IGNORE)
    targets[rows, query_at] = keys
    return TaskBatch(inputs, targets)


def mqar(n: int, generator: torch.Generator, pairs: int, gap: int = 0) -> TaskBatch:
    """[k1 v1 ... kp vp, `gap` distractors, then each key again in random order followed by its value]: 4·pairs +
    gap tokens, scored at the repeated keys."""
    if not 1 <= pairs <= len(KEYS):
        raise ValueError(f"mqar needs 1 <= pairs <= {len(KEYS)}, got {pairs}")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"mqar needs an integer gap >= 0, got {gap!r}")
    keys = torch.argsort(torch.rand(n, len(KEYS), generator=generator), dim=1)[:, :pairs] + KEYS.start
    values = _values(n, pairs, generator)
    order = torch.argsort(torch.rand(n, pairs, generator=generator), dim=1)
    asked, answers = keys.gather(1, order), values.gather(1, order)
    stored = torch.stack([keys, values], dim=2).reshape(n, 2 * pairs)
    queries = torch.stack([asked, answers], dim=2).reshape(n, 2 * pairs)
    # drawn last, so gap = 0 draws exactly the sequences it drew before the gap existed
    between = torch.randint(DISTRACTORS.start, DISTRACTORS.stop, (n, gap), generator=generator)
    inputs = torch.cat([stored, between, queries], dim=1)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, 2 * pairs + gap :: 2] = answers
    return TaskBatch(inputs, targets)


def selective_copy(n: int, generator: torch.Generator, length: int, count: int) -> TaskBatch:
    """`count` values scattered over `length` NOISE tokens, then `count` GO tokens scored with the values in order."""
    if not 1 <= count <= length:
        raise ValueError(f"selective_copy needs 1 <= count <= length, got count={count}, length={length}")
    positions = torch.argsort(torch.rand(n, length, generator=generator), dim=1)[:, :count].sort(dim=1).values
    values = _values(n, count, generator)
    inputs = torch.full((n, length + count), NOISE, dtype=torch.long)
    inputs.scatter_(1, positions, values)
    inputs[:, length:] = GO
    targets = torch.full_like(inputs, IGNORE)
    targets[:, length:] = values
    return TaskBatch(inputs, targets)


def parity(n: int, generator: torch.Generator, length: int) -> TaskBatch:
    """`length` bits; the target at every step is the parity of the bits up to and including it."""
    bits = torch.randint(0, 2, (n, length), generator=generator)
    return TaskBatch(bits, bits.cumsum(dim=1) % 2)


TASKS = {"recall": recall, "mqar": mqar, "selective_copy": selective_copy, "parity": parity}
CHANCE = {"recall": 1 / VALUES, "mqar": 1 / VALUES, "selective_copy": 1 / VALUES, "parity": 1 / 2}


def make_batch(task: str, n: int, generator: torch.Generator, **params) -> TaskBatch:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
    return TASKS[task](n, generator, **params)


def held_out_set(task: str, n: int, index: int, **params) -> TaskBatch:
    """The held-out sequences of a task: from a generator seeded `TEST_SEED_BASE + index`, never used in training."""
    return make_batch(task, n, torch.Generator().manual_seed(TEST_SEED_BASE + index), **params)


def validation_set(task: str, n: int, index: int, **params) -> TaskBatch:
    """Sequences to choose settings on: seeded `VALIDATION_SEED_BASE + index`, neither trained on nor held out."""
    return make_batch(task, n, torch.Generator().manual_seed(VALIDATION_SEED_BASE + index), **params)


def train_generator(seed: int) -> torch.Generator:
    if not 0 <= seed < VALIDATION_SEED_BASE:
        raise ValueError(
            f"training seeds must be in [0, {VALIDATION_SEED_BASE}) (above are the validation and held-out sets), "
            f"got {seed}"
        )
    return torch.Generator().manual_seed(seed)
