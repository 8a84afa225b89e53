"""Adaptive Resonance Theory memory: exact, batched, checkpointable, and the same on every training process.

An [`ARTMemory`] clusters vectors (a model's pooled hidden states) into categories without backpropagation. Each input
either *resonates* with a category it has seen, and moves that category's prototype toward itself, or creates a *new*
category; when the memory is full, an input that resonates nowhere is *rejected* and nothing learned is overwritten.
Semantics: `docs/design.md#artmemory`. `update(x)` gives the categories and statuses of the one-at-a-time loop over the
rows of `x`, for any batch size and any way of splitting a stream into calls.

Rules live in `ART_RULES`, each written as artlib's `BaseART` pieces (`prepare_input`, `choice`, `match`, `learn`):

- `cosine` (default): choice and match are the cosine similarity; the most similar category resonates if its
  similarity is at least the vigilance, and learns `w <- (1 - beta) w + beta x`.
- `fuzzy`: Fuzzy ART (Carpenter, Grossberg & Rosen 1991) on inputs in [0, 1], complement coded `I = [a, 1 - a]`;
  choice `|I ^ w| / (alpha + |w|)`, match `|I ^ w| / |I|`, learning `w <- beta (I ^ w) + (1 - beta) w`.

Arithmetic: what "exact" means here
-----------------------------------
Decisions are those of the one-at-a-time loop evaluated in float64, whatever the dtype of the inputs or of the stored
prototypes (float32 on devices without float64, such as MPS). During an `update` call the prototypes live in a float64
working copy, written back to the buffers' dtype when the call returns.

- `cosine`: the similarity is `x.w / sqrt(|x|^2 |w|^2)` (0 if either vector is zero). The winner's similarity, used
  for the vigilance test and reported, is computed in float64 from the actual vectors, its three sums by the same
  reduction, so an input equal to a prototype scores exactly 1.0. Finding the winner among K categories uses float32
  cosines of unit-length copies (a matmul), which are provably within `(D + 16) 2^-24` of the exact ones; wherever a
  rival comes within twice that of the best, the candidates are re-scored in float64 and the argmax (ties to the
  lowest index) is taken over the exact values. So the winner is the float64 argmax, at float32 matmul speed. (Only
  plain IEEE float32 matmuls qualify: under TF32 or a lower `torch.get_float32_matmul_precision()`, the approximate
  scores are float64 too.)
  Rows go through in blocks: the block is decided against the memory as it is, then each row is checked against the
  prototypes its predecessors' decisions produce, and checked again until decisions and checks agree, which is the
  loop's answer (see `ARTRule.update_rows`). Within a block a prototype's successive values come from a closed form
  of its chain of updates, so they can differ from the loop's by float64 rounding (~1e-16 relative).
- `fuzzy`: each input is compared with every category directly (element-wise minimum and sums in float64): the
  loop's own arithmetic, pair by pair. Rows go through in the same blocks, checked against the versions their
  predecessors' updates leave (computed with `learn` along each chain, as the loop does). `|I|` is the computed sum
  of the complement-coded input, so an input equal to a prototype matches with exactly 1.0.

So decisions can differ from another float64 evaluation of the loop only where two scores, or a score and the
vigilance, agree to about 15 digits; when the sums are exact (small integer or dyadic data) every tie and threshold is
decided as in the loop. (torch's own float64 `sqrt` on CPU is not always correctly rounded; the loop is "the same
dtype" only when it uses torch's.) With float32 (the default) or bf16 buffers, prototypes are rounded to the buffer
dtype once per call, not once per update, so splitting a stream into calls differently can move them by that
rounding; decisions change only if a score sits that close to a tie or to the vigilance.

This file travels to the Hub as remote code: it imports only the standard library, torch, transformers and
safetensors.
"""

import enum
import functools
import hashlib
import json
import math
import numbers
import os
import struct
import uuid
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from transformers.utils import cached_file

ART_MEMORY_FILE = "art_memory.safetensors"
ART_FORMAT = "gptb-art-memory"
ART_FORMAT_VERSION = 1


def _exact_arithmetic(method):
    """Run without autograd and outside autocast: under bf16 mixed precision the scores must stay float64."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            if torch.cuda.is_available():
                with torch.autocast("cuda", enabled=False):
                    return method(self, *args, **kwargs)
            return method(self, *args, **kwargs)

    return wrapper


class ARTStatus(enum.IntEnum):
    """What a memory did (or, for `classify`, would do) with an input: the codes in `ARTOutput.status`."""

    RESONATED = 0  # matched a category, which learned from the input
    NEW = 1  # matched nothing: a new category was created
    REJECTED = 2  # matched nothing and the memory is full: nothing was learned


@dataclass
class ARTOutput:
    """
    What an [`ARTMemory`] made of each input row.

    Args:
        category (`torch.LongTensor` of shape `(N,)`):
            The category of each row: the one it resonated with or created; -1 where it was rejected and, for
            `classify`, where no category passes the vigilance.
        status (`torch.LongTensor` of shape `(N,)`): [`ARTStatus`] codes; `status_names()` spells them out.
        similarity (`torch.DoubleTensor` of shape `(N,)`):
            The winner's score: cosine similarity for `cosine`, match value for `fuzzy`. Where nothing resonated, the
            best score over the categories (0 when there were none).
        novelty (`torch.DoubleTensor` of shape `(N,)`):
            1 - the best similarity (`cosine`, in [0, 2]) or 1 - the best match (`fuzzy`, in [0, 1]), measured before
            the row was learned; 1 for an empty memory.
    """

    category: torch.LongTensor
    status: torch.LongTensor
    similarity: torch.Tensor
    novelty: torch.Tensor

    def status_names(self) -> list[str]:
        """The status of each row as a name: "resonated", "new" or "rejected"."""
        return [ARTStatus(code).name.lower() for code in self.status.tolist()]

    def __len__(self) -> int:
        return self.category.shape[0]

    def __getitem__(self, index) -> "ARTOutput":
        """The output of a subset of the rows (an int, slice, mask or index tensor)."""
        if isinstance(index, int):
            index = [index]
        return ARTOutput(self.category[index], self.status[index], self.similarity[index], self.novelty[index])


def to_unit_interval(x: torch.Tensor, low: float | None = None, high: float | None = None) -> torch.Tensor:
    """
    Map real vectors (hidden states) into [0, 1] for the `fuzzy` rule, which refuses anything outside.

    Without bounds: the logistic sigmoid, monotone and defined everywhere (it saturates far from 0: scale the inputs
    first if their spread is large). With fixed bounds: `(x - low) / (high - low)`, clipped to [0, 1]; the clipping is
    explicit here, `ARTMemory.update` never clips.
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if low is None and high is None:
        return torch.sigmoid(x)
    if low is None or high is None or not high > low:
        raise ValueError(f"to_unit_interval needs both bounds with high > low, got low={low!r}, high={high!r}")
    return ((x - low) / (high - low)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameter checks (shared by the constructor, the setters and the file loader)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_alpha(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < math.inf:
        raise ValueError(f"alpha must be a finite number > 0, got {value!r}")
    return float(value)


def _check_rule(value) -> str:
    if value not in ART_RULES:
        raise ValueError(f"unknown ART rule {value!r}; expected one of {sorted(ART_RULES)}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Scores


def _score_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _norm_product(a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """sqrt(|a|^2 |b|^2), kept away from 0 so that a zero vector scores 0."""
    return (a_sq * b_sq).clamp_min(torch.finfo(a_sq.dtype).tiny).sqrt()


def _cosine(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise `a.b / sqrt(|a|^2 |b|^2)` (0 if either is zero) for `a`, `b` of the same shape `(..., D)`.

    The three sums are the same reduction over same-shaped operands, so they are rounded alike: `a == b` gives exactly
    1.0. `a_sq` may pass `vecdot(a, a)` in when it is already known.
    """
    a_sq = torch.linalg.vecdot(a, a) if a_sq is None else a_sq
    return torch.linalg.vecdot(a, b) / _norm_product(a_sq, torch.linalg.vecdot(b, b))


def _approx_dtype(x: torch.Tensor) -> tuple[torch.dtype, float]:
    """Dtype of the approximate cosines, and how far apart two of them may be and still need an exact look.

    Rounding unit vectors of D features to a dtype and taking their dot product there moves the result by at most
    about D units of that dtype's rounding, whatever the summation order; normalising them first in `x`'s dtype
    (norm, reciprocal, product) adds about 3 D of its units. float32 is used where matmuls are plain IEEE float32 (no
    TF32 or bf16 passes).
    """
    plain_fp32 = torch.get_float32_matmul_precision() == "highest"
    if x.is_cuda:
        plain_fp32 = plain_fp32 and not torch.backends.cuda.matmul.allow_tf32
    dtype = torch.float32 if plain_fp32 else x.dtype
    error = (x.shape[-1] + 16) * (torch.finfo(dtype).eps + 3 * torch.finfo(x.dtype).eps) / 2
    return dtype, 2 * error  # both the best and a rival may be off by `error`


def _unit(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay zero) and rounded to `dtype`: their products are cosines, in a safe
    range whatever the scale of the vectors."""
    norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    # a product by the reciprocal, then the cast: a division, or one into another dtype, is much slower on CPU
    return (v * norms.reciprocal()).to(dtype)


def _exact_argmax(scores, tolerance, x, seen):
    """
    The argmax of approximate cosines per row (ties to the lowest index), made exact: where other categories are
    within `tolerance` of the best, those candidates are re-scored with the exact cosine (`_cosine` of `x[r]` and
    `seen(r, c)`) and the argmax is taken over them. Returns the winners and the best approximate scores (-inf: the row
    had no category at all).
    """
    if scores.shape[1] == 1:
        return scores.new_zeros(scores.shape[0], dtype=torch.long), scores[:, 0]
    top = scores.topk(2, dim=1)  # the best and the runner-up: one pass
    winner, best = top.indices[:, 0], top.values[:, 0]
    ties = (top.values[:, 1] >= best - tolerance) & (best > -math.inf)
    if ties.any():  # rare outside exact ties: candidates closer than the approximation can tell apart
        near = scores >= (best - tolerance)[:, None]
        r, c = (near & ties[:, None]).nonzero(as_tuple=True)
        exact = torch.full(scores.shape, -math.inf, dtype=x.dtype, device=x.device)
        exact[r, c] = _cosine(x[r], seen(r, c))
        winner = torch.where(ties, exact.argmax(1), winner)
    return winner, best


# ---------------------------------------------------------------------------------------------------------------------
# Rules


class _Steps(NamedTuple):
    """What an update engine decided for each of its rows (device tensors, one entry per row)."""

    target: torch.Tensor  # slab row written: the category, or the overflow row when rejected
    resonated: torch.Tensor  # bool
    similarity: torch.Tensor  # the winner's score, or the best one where nothing resonated (-inf: no category)
    best: torch.Tensor  # the best score over the categories, for the novelty
    committed: int  # number of categories in use after the rows


class _Decisions(NamedTuple):
    """A block's decisions, one entry per row, with the best score over the categories (for the novelty)."""

    winner: torch.Tensor
    resonated: torch.Tensor
    similarity: torch.Tensor
    best: torch.Tensor


def _scratch_elements(x: torch.Tensor) -> int:
    """How many (row, category, feature) elements an element-wise score may hold at once: about what a CPU core's
    caches keep (measured: 4 MB chunks ran 1.7x faster than 16 MB ones, 4.5x faster than 64 MB), and large chunks
    on an accelerator, where each chunk costs kernel launches."""
    return 2**19 if x.device.type == "cpu" else 2**24


def _scratch_buffer(call: dict | None, like: torch.Tensor, numel: int) -> torch.Tensor:
    """A flat scratch tensor of at least `numel` elements, kept in `call` so that every block of an update reuses it:
    a fresh temporary of megabytes per chunk costs more in page faults than the arithmetic done in it."""
    buffer = None if call is None else call.get("scratch")
    if buffer is None or buffer.numel() < numel:
        buffer = like.new_empty(numel)
        if call is not None:
            call["scratch"] = buffer
    return buffer


class ARTRule:
    """
    One ART variant in the shape of artlib's `BaseART`: `prepare_input`, `choice`, `match` and `learn`.

    A rule holds no state. Prototypes are the rows of `w` (K, stored_dim), prepared inputs the rows of `i`
    (n, stored_dim), all in the score dtype; `params` holds the memory's `vigilance`, `beta` and `alpha`. With these
    pieces the generic `decide` and block engine below are a complete, exact memory, so a new rule is a subclass and
    an entry in `ART_RULES`. A rule may override the engine's steps (`_first_decisions`, `_versions`, `_recheck`,
    `_apply`) with faster ones that keep the same decisions, as `CosineRule` does.
    """

    name = ""
    default_beta = 1.0
    # Block engine: blocks grow while guesses hold at the first check and shrink when they need more rounds.
    block_size, min_block_size, max_block_size, max_rounds = 16, 4, 64, 4

    def stored_dim(self, dim: int) -> int:
        """Width of a prototype for inputs of `dim` features."""
        return dim

    def check_input(self, x: torch.Tensor) -> None:
        """Raise `ValueError` for finite inputs the rule cannot take."""

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Turn inputs (n, dim) into what the prototypes are compared with (n, stored_dim)."""
        return x

    def choice(self, i: torch.Tensor, w: torch.Tensor, params: dict) -> tuple[torch.Tensor, object]:
        """Choice values (n, K): candidates are tried in decreasing order. Also returns a cache for `match`."""
        raise NotImplementedError

    def match(self, i: torch.Tensor, w: torch.Tensor, params: dict, cache) -> torch.Tensor:
        """Match values (n, K), compared with the vigilance."""
        raise NotImplementedError

    def learn(self, i: torch.Tensor, w: torch.Tensor, params: dict) -> torch.Tensor:
        """New prototypes for the rows of `w` after resonating with the aligned rows of `i`."""
        raise NotImplementedError

    def commit(self, i: torch.Tensor, params: dict) -> torch.Tensor:
        """Prototype of a new category created by `i` (fast commit)."""
        return i

    def decide(self, i: torch.Tensor, w: torch.Tensor, params: dict, valid: torch.Tensor | None = None):
        """
        The ART search for each row of `i` against the categories `w` (those where `valid`, shape (K,), if given).

        Returns the winner (n,), whether it resonates (n,), the similarity (the winner's match, or the best match
        where nothing resonates; -inf without categories) and the best match (n,).
        """
        choice, match = self._scores(i, w, params)
        if valid is not None:
            match = match.masked_fill(~valid, -math.inf)
        return self._search(choice, match, params)

    @staticmethod
    def _search(choice, match, params) -> _Decisions:
        """
        Trying candidates in order of decreasing choice (ties to the lowest index) and stopping at the first whose
        match passes the vigilance picks the candidate of highest choice among those that pass: one masked argmax.
        A match of -inf marks a category that is not there.
        """
        passed = match >= params["vigilance"]
        winner = choice.masked_fill(~passed, -math.inf).argmax(-1, keepdim=True)
        resonated = passed.gather(-1, winner).squeeze(-1)
        best = match.amax(-1) if match.shape[-1] else match.new_full(match.shape[:-1], -math.inf)
        similarity = torch.where(resonated, match.gather(-1, winner).squeeze(-1), best)
        return _Decisions(winner.squeeze(-1), resonated, similarity, best)

    def _scores(self, i, w, params, call=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Choice and match (n, K), in row chunks that bound the scratch of element-wise rules."""
        if w.shape[0] == 0:
            empty = i.new_empty(i.shape[0], 0)
            return empty, empty
        per_chunk = max(1, _scratch_elements(i) // w.numel())
        parts = []
        for chunk in i.split(per_chunk):
            choice, cache = self.choice(chunk, w, params)
            parts.append((choice, self.match(chunk, w, params, cache)))
        choice, match = (torch.cat(field) for field in zip(*parts, strict=True))
        return choice, match

    # -- the block engine ----------------------------------------------------------------------------------------

    def update_rows(self, w, counts, num_committed: int, rows, params: dict) -> _Steps:
        """
        Learn from `rows` (prepared inputs) one at a time, in order, in place: the one-at-a-time loop's decisions.

        `w` (kw + 1, stored_dim) holds categories 0..kw-1, the first `num_committed` of them in use, and an overflow
        row kw that takes the write of a rejected input; `counts` (kw + 1,) is laid out alike.

        Block by block: decide a block of rows against the memory as it is, take that as a guess, and check every
        row against the prototypes its predecessors' guessed updates produce; repeat with the checked decisions
        until they agree with the guess. A row checked against right predecessors is right, so each round fixes at
        least one more row, and a guess that agrees with its own check is the loop's answer. Typical blocks agree
        at once, so a block of rows costs a few tensor operations, not a few per row.
        """
        kw = w.shape[0] - 1  # the overflow row
        call = self._start_call(w, rows, num_committed)
        k, start, block = num_committed, 0, self.block_size
        steps = []
        while start < rows.shape[0]:
            x = rows[start : start + block]
            m = x.shape[0]
            first, extra = self._first_decisions(call, w, k, min(k + m, kw), start, x, params)
            guess = _targets(first.winner, first.resonated, None, k, kw)
            rounds = 0
            while True:
                rounds += 1
                chains = _Chains(guess[0], kw)
                versions = self._versions(call, w, k, x, first, extra, chains, guess[1], params)
                checked = self._recheck(call, w, k, start, x, first, extra, chains, versions, params)
                target = _targets(checked.winner, checked.resonated, guess[1], k, kw)
                agree = (target[0] == guess[0]) & (target[1] == guess[1])
                # Rows before the first disagreement are right; if all agree, the whole block is.
                done = m if agree.all() else int((~agree).int().argmax())
                if done == m or rounds == self.max_rounds:
                    break
                guess = target
            target, resonated = target[0][:done], checked.resonated[:done]
            # Apply the rows that are right: each category they touched takes the last version of its chain.
            self._apply(call, w, target, chains.last(done), versions)
            counts.index_add_(0, target, torch.ones_like(target))
            k = min(k + int((~resonated).sum()), kw)
            steps.append((target, resonated, checked.similarity[:done], checked.best[:done]))
            start += done
            block = min(2 * block, self.max_block_size) if rounds == 1 else max(block // 2, self.min_block_size)
        return _Steps(*(torch.cat(field) for field in zip(*steps, strict=True)), committed=k)

    def _start_call(self, w, rows, num_committed) -> dict:
        """Whatever the steps below share across the blocks of one call."""
        return {}

    def _first_decisions(self, call, w, k, kb, start, x, params):
        """Decisions of a block's rows against the memory as it is (categories 0..k-1 of the kb it can reach)."""
        choice = x.new_full((x.shape[0], kb), -math.inf)
        match = torch.full_like(choice, -math.inf)
        choice[:, :k], match[:, :k] = self._scores(x, w[:k], params, call)
        return self._search(choice, match, params), (choice, match)

    def _versions(self, call, w, k, x, first, extra, chains, resonated, params):
        """Each row's category right after the row's update, along the chains of the guess (`commit` for rows
        that create a category, and for rejected rows, whose write goes to the overflow row)."""
        versions = self.commit(x, params).clone()
        position = chains.upto.sum(1)  # place of each row in its category's chain (0: rejected)
        previous = torch.where(chains.upto & (chains.rows[None, :] < chains.rows[:, None]), chains.rows, -1).amax(1)
        for depth in range(1, int(position.max()) + 1):  # usually one or two passes
            rows = ((position == depth) & resonated).nonzero().squeeze(1)
            if rows.numel():
                before = w.index_select(0, chains.target[rows]) if depth == 1 else versions[previous[rows]]
                versions[rows] = self.learn(x[rows], before, params)
        return versions

    def _recheck(self, call, w, k, start, x, first, extra, chains, versions, params) -> _Decisions:
        """Decisions of a block's rows given the guessed updates of the rows before each: the categories touched
        before a row compete in their current version."""
        m, kb = extra[0].shape
        touched_before = chains.first_touch()[:kb] < chains.rows[:, None]
        columns = torch.where(chains.applies, chains.target, 0).expand(m, m)
        merged = []
        for block_start, current in zip(extra, self._scores(x, versions, params, call), strict=True):
            scores = block_start.masked_fill(touched_before, -math.inf)
            merged.append(scores.scatter_reduce_(1, columns, current.masked_fill(~chains.current, -math.inf), "amax"))
        return self._search(*merged, params)

    def _apply(self, call, w, target, last, versions):
        """Write the accepted rows' updates: each category takes the last version of its chain."""
        w.index_copy_(0, target, _latest(versions, last, target.shape[0]))


class CosineRule(ARTRule):
    """Cosine ART: the most similar prototype resonates if its cosine similarity reaches the vigilance."""

    name = "cosine"
    default_beta = 0.5
    block_size, min_block_size, max_block_size, max_rounds = 32, 8, 128, 4

    def choice(self, i, w, params):
        similarity = (i @ w.T) / _norm_product(torch.linalg.vecdot(i, i)[:, None], torch.linalg.vecdot(w, w))
        return similarity, similarity

    def match(self, i, w, params, cache):
        return cache

    def learn(self, i, w, params):
        return (1 - params["beta"]) * w + params["beta"] * i

    def decide(self, i, w, params, valid=None):
        # Choice and match are the same score, so the search is an argmax (made exact by `_exact_argmax`).
        dtype, tolerance = _approx_dtype(i)
        scores = _unit(i, dtype) @ _unit(w, dtype).T
        if valid is not None:
            scores = scores.masked_fill(~valid, -math.inf)
        winner, _, similarity, _ = _decide_cosine(i, torch.linalg.vecdot(i, i), scores, tolerance, _Seen(w))
        return _Decisions(winner, similarity >= params["vigilance"], similarity, similarity)

    # The engine's steps, at float32 matmul speed: approximate cosines of unit vectors pick the candidates, exact
    # float64 cosines decide (see the module docstring); versions come from a closed form of each chain.

    def _start_call(self, w, rows, num_committed):
        dtype, tolerance = _approx_dtype(rows)
        units = _unit(rows, dtype)  # products of unit rows are (approximate) cosines
        w_units = units.new_empty(w.shape)  # rows past the categories in use are written as they are created
        w_units[:num_committed] = _unit(w[:num_committed], dtype)
        return {"dtype": dtype, "tolerance": tolerance, "units": units, "w_units": w_units}

    def _first_decisions(self, call, w, k, kb, start, x, params):
        x_units = call["units"][start : start + x.shape[0]]
        scores = x_units.new_empty(x.shape[0], kb)
        torch.mm(x_units, call["w_units"][:k].T, out=scores[:, :k])  # the O(n K D) work
        scores[:, k:] = -math.inf  # not in use yet
        winner, best, similarity, prototypes = _decide_cosine(
            x, torch.linalg.vecdot(x, x), scores, call["tolerance"], _Seen(w)
        )
        decisions = _Decisions(winner, similarity >= params["vigilance"], similarity, similarity)
        return decisions, (x_units, scores, (winner, best, similarity), prototypes)

    def _versions(self, call, w, k, x, first, extra, chains, resonated, params):
        # Block-start prototypes of the categories the rows update (usually their first winners').
        existing = chains.target < k
        start_w = extra[3]
        if (existing & (chains.target != first.winner)).any():
            start_w = torch.where((chains.target == first.winner)[:, None], start_w, w.index_select(0, chains.target))
        versions = chains.versions(x, start_w, existing, resonated, params["beta"])
        return versions, _unit(versions, call["dtype"])

    def _recheck(self, call, w, k, start, x, first, extra, chains, versions, params):
        x_units, scores, first_decided, _ = extra
        seen = _Seen(w, chains, versions[0])
        winner, similarity = self._redecide(
            x, x_units, versions[1], call["w_units"][:k], scores, call["tolerance"], seen, first_decided
        )
        return _Decisions(winner, similarity >= params["vigilance"], similarity, similarity)

    def _apply(self, call, w, target, last, versions):
        w.index_copy_(0, target, _latest(versions[0], last, target.shape[0]))
        call["w_units"].index_copy_(0, target, _latest(versions[1], last, target.shape[0]))

    @staticmethod
    def _redecide(x, x_units, v_units, start_units, scores, tolerance, seen, first):
        """
        Winners and similarities of a block's rows given the guessed updates of the rows before each (`seen`).

        A row keeps its block-start decision (`first`) unless an earlier row touched a category that scored within
        `tolerance` of its best, or left a version that does: then the categories touched before it compete in their
        current version instead, and the row is decided again.
        """
        chains = seen.chains
        m, kb = scores.shape
        winner, best, similarity = (field.clone() for field in first)
        current = chains.current
        columns = torch.where(chains.applies, chains.target, 0).expand(m, m)
        start_scores = scores.gather(1, columns)  # each row against the block-start prototype of each row's category
        floor = best[:, None] - tolerance
        earlier = chains.applies[None, :] & (chains.rows[None, :] < chains.rows[:, None])
        swayed = (start_scores >= floor) & earlier
        # Which versions score near a row's best: a version's cosine is at most the block-start prototype's plus the
        # distance the unit prototype moved, so only versions that bound cannot rule out are scored (not all m).
        existing = chains.target < start_units.shape[0]  # a category in use at the block start (not a new one)
        if existing.any():
            start = start_units.index_select(0, torch.where(existing, chains.target, 0))
            moved = torch.linalg.vector_norm(v_units - start, dim=1)
        else:
            moved = torch.zeros_like(best, dtype=v_units.dtype)
        bound = torch.where(existing[None, :], start_scores + moved[None, :] + tolerance, math.inf)
        candidates = current & (bound >= floor)
        scored = candidates.any(0).nonzero().squeeze(1)
        if scored.numel():
            version_scores = x_units @ v_units.index_select(0, scored).T
            swayed[:, scored] |= candidates[:, scored] & (version_scores >= floor)
        rows = swayed.any(1).nonzero().squeeze(1)
        if rows.numel():
            touched_before = chains.first_touch()[:kb] < rows[:, None]
            merged = scores.index_select(0, rows).masked_fill(touched_before, -math.inf)
            version_scores = (x_units.index_select(0, rows) @ v_units.T).masked_fill(~current[rows], -math.inf)
            merged.scatter_reduce_(1, columns.index_select(0, rows), version_scores, "amax")
            x_rows = x.index_select(0, rows)
            decided = _decide_cosine(x_rows, torch.linalg.vecdot(x_rows, x_rows), merged, tolerance, seen, rows)
            winner[rows], similarity[rows] = decided[0], decided[2]
        return winner, similarity


class _Chains:
    """For a guess of the categories a block's rows update (`kw`: none), which rows update the same category."""

    def __init__(self, target: torch.Tensor, kw: int):
        self.target, self.kw = target, kw
        self.rows = torch.arange(target.shape[0], device=target.device)
        self.applies = target != kw
        self.same = (target[:, None] == target[None, :]) & self.applies[:, None] & self.applies[None, :]
        # upto[u, l]: row l updates u's category at or before row u.
        self.upto = self.same & (self.rows[None, :] <= self.rows[:, None])
        later = self.same & (self.rows[:, None] > self.rows[None, :])
        following = torch.where(later.any(0), later.int().argmax(0), target.shape[0])  # next update of u's category
        # current[r, u]: row u's version is the prototype of its category when row r arrives.
        rows = self.rows
        self.current = self.applies[None, :] & (rows[None, :] < rows[:, None]) & (rows[:, None] <= following[None, :])

    def versions(self, x, start_w, existing, resonated, beta):
        """Each row's category right after the row's update: a closed form of the chain of updates before it.

        Along a chain, `w <- (1 - beta) w + beta x` (or `w <- x` for a new category) makes the version after row u
        `(1 - beta)^p w_start + sum_l c_l (1 - beta)^(p_u - p_l) x_l` over the chain's rows l up to u, with `p` the
        position in the chain and `c_l` = beta (or 1 for the row that created the category). `start_w` holds the
        block-start prototype of each row's category (ignored where it is not `existing`).
        """
        position = self.upto.sum(1).to(x.dtype)
        decay = x.new_tensor(1 - beta)
        rate = torch.where(resonated, x.new_tensor(beta), x.new_tensor(1.0))
        carry = torch.where(existing, decay**position, 0.0)  # share of the block-start prototype
        # (where, not a product: a new category's slot is not written yet and may hold anything)
        carried = torch.where(existing[:, None], carry[:, None] * start_w, 0.0)
        versions = torch.addcmul(carried, rate[:, None], x)  # the row's own step
        chained = (position > 1).nonzero().squeeze(1)  # rows whose category earlier rows of the block updated too
        if chained.numel():
            earlier = self.upto[chained].clone()
            earlier[torch.arange(chained.shape[0], device=x.device), chained] = False
            coef = earlier * decay ** (position[chained, None] - position[None, :]).clamp_min(0) * rate
            versions[chained] += coef @ x
        return versions

    def first_touch(self) -> torch.Tensor:
        """(kw + 1,): the first row that updates each category (the block length if none)."""
        m = self.rows.shape[0]
        first = self.target.new_full((self.kw + 1,), m)
        return first.scatter_reduce(0, self.target, torch.where(self.applies, self.rows, m), "amin")

    def last(self, p: int) -> torch.Tensor | None:
        """For each of the first `p` rows, the last of them that updates the same category (itself if none); None
        when each is its own last (no two update the same category), the usual case."""
        rows = self.rows[:p]
        last = torch.where(self.same[:p, :p], rows[None, :], rows[:, None]).amax(1)
        return None if bool((last == rows).all()) else last


def _latest(versions: torch.Tensor, last: torch.Tensor | None, p: int) -> torch.Tensor:
    """The version each of the first `p` rows' categories ends the block with (see `_Chains.last`)."""
    return versions[:p] if last is None else versions.index_select(0, last)


class _Seen:
    """The prototype of category c as row r of a block sees it: the block-start one, or the version left by the last
    row before r that updated c (under a guess of the block's updates, `chains` and `versions`)."""

    def __init__(self, w, chains=None, versions=None):
        self.w, self.chains, self.versions = w, chains, versions

    def __call__(self, r, c):
        prototype = self.w.index_select(0, c)
        if self.chains is None:
            return prototype
        version = self.chains.current[r] & (self.chains.target == c[:, None])
        return torch.where(
            version.any(1, keepdim=True), self.versions.index_select(0, version.int().argmax(1)), prototype
        )


def _decide_cosine(x, x_sq, scores, tolerance, seen, rows=None):
    """Winner, best approximate score, exact similarity and the winner's prototype for each row of `x` (block rows
    `rows`, default all)."""
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    winner, best = _exact_argmax(scores, tolerance, x, lambda r, c: seen(rows[r], c))
    prototype = seen(rows, winner)
    similarity = _cosine(x, prototype, x_sq).masked_fill(torch.isneginf(best), -math.inf)
    return winner, best, similarity, prototype


def _targets(winner, resonated, guessed_resonated, k, kw):
    """Where each row's update goes: its winner, or for a miss the next free category given the misses guessed before
    it (its own block's decisions when there is no guess yet); the overflow row `kw` once the memory is full."""
    missed = ~(resonated if guessed_resonated is None else guessed_resonated)
    return torch.where(resonated, winner, (k + missed.cumsum(0) - missed.long()).clamp_max(kw)), resonated


class FuzzyRule(ARTRule):
    """Fuzzy ART on inputs in [0, 1], complement coded; the uncommitted node does not compete (artlib's convention)."""

    name = "fuzzy"
    default_beta = 1.0

    def stored_dim(self, dim):
        return 2 * dim

    def check_input(self, x):
        low, high = x.aminmax()
        if low < 0 or high > 1:
            raise ValueError(
                f"the fuzzy rule needs inputs in [0, 1], got values in [{low.item():g}, {high.item():g}]; map them "
                "first, e.g. with to_unit_interval(x) (a sigmoid) or to_unit_interval(x, low, high) (fixed bounds)"
            )

    def prepare_input(self, x):
        return torch.cat((x, 1 - x), -1)

    def choice(self, i, w, params):
        overlap = self._overlap(i, w)
        return self._choice(overlap, w, params), overlap

    def match(self, i, w, params, overlap):
        return overlap / i.sum(-1, keepdim=True)

    @staticmethod
    def _overlap(i, w, out=None):
        """|I ^ w_j| for each row of `i` and each prototype, (n, K)."""
        return torch.minimum(i[:, None, :], w, out=out).sum(-1)

    @staticmethod
    def _choice(overlap, w, params):
        return overlap / (params["alpha"] + w.sum(-1))

    def _scores(self, i, w, params, call=None):
        # choice and match through one reused scratch buffer for the (rows, K, 2 dim) minima
        if w.shape[0] == 0:
            return super()._scores(i, w, params)
        per_chunk = min(max(1, _scratch_elements(i) // w.numel()), i.shape[0])
        scratch = _scratch_buffer(call, i, per_chunk * w.numel())
        overlap = torch.cat(
            [
                self._overlap(chunk, w, out=scratch[: chunk.shape[0] * w.numel()].view(chunk.shape[0], *w.shape))
                for chunk in i.split(per_chunk)
            ]
        )
        return self._choice(overlap, w, params), self.match(i, w, params, overlap)

    def learn(self, i, w, params):
        return params["beta"] * torch.minimum(i, w) + (1 - params["beta"]) * w


ART_RULES: dict[str, type[ARTRule]] = {rule.name: rule for rule in (CosineRule, FuzzyRule)}


# ---------------------------------------------------------------------------------------------------------------------
# The memory


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ARTMemory(nn.Module):
    """
    An Adaptive Resonance Theory memory of at most `max_categories` prototypes (see the module docstring).

    Args:
        dim (`int`): features per input.
        rule (`str`, defaults to `"cosine"`): a key of `ART_RULES` (`"cosine"` or `"fuzzy"`).
        vigilance (`float`, defaults to 0.75): resonance threshold in [0, 1].
        beta (`float`, *optional*): learning rate in [0, 1]; `None` takes the rule's default (0.5 for `cosine`, the
            plain average of prototype and input; 1.0 for `fuzzy`, fast learning).
        alpha (`float`, defaults to 1e-3): Fuzzy ART's choice parameter (> 0); unused by `cosine`.
        max_categories (`int`, defaults to 1024): capacity. Full memories reject, never overwrite.
        device, dtype: of the prototype buffer (dtype defaults to torch's default float dtype).

    The state is three fixed-capacity buffers, so it lives in a parent model's `state_dict` and comes back with
    `load_state_dict` (how `Trainer` resumes): `weight` (max_categories, stored_dim) with the prototypes in its first
    `num_committed` rows, `category_counts` (max_categories,) and `num_committed` (a 0-d long tensor). `stored_dim` is
    `dim` for `cosine` and `2 * dim` for `fuzzy` (complement coding). The memory follows `.to(device / dtype)`; scores
    are computed in float64 whatever the buffer dtype.
    """

    def __init__(
        self,
        dim: int,
        rule: str = "cosine",
        vigilance: float = 0.75,
        beta: float | None = None,
        alpha: float = 1e-3,
        max_categories: int = 1024,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.dim = _check_int("dim", dim)
        self._rule = ART_RULES[_check_rule(rule)]()
        capacity = _check_int("max_categories", max_categories)
        self.vigilance = vigilance
        self.beta = self._rule.default_beta if beta is None else beta
        self.alpha = alpha
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        shape = (capacity, self._rule.stored_dim(self.dim))
        self.register_buffer("weight", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("category_counts", torch.zeros(capacity, device=device, dtype=torch.long))
        self.register_buffer("num_committed", torch.zeros((), device=device, dtype=torch.long))
        self._warned_full = False

    # Hyperparameters are checked whenever they are set.
    @property
    def rule(self) -> str:
        return self._rule.name

    @property
    def max_categories(self) -> int:
        """The capacity: the rows of the prototype buffer."""
        return self.weight.shape[0]

    @max_categories.setter
    def max_categories(self, value):
        if value != self.max_categories:  # a larger value would let an update write past the buffer
            raise ValueError(
                f"max_categories is the size of the prototype buffer ({self.max_categories} rows) and cannot be "
                f"set to {value!r} on a memory; build ARTMemory(..., max_categories={value!r}) and load this one "
                "into it (ARTMemory.load_file takes a file saved with another capacity)"
            )

    @property
    def vigilance(self) -> float:
        return self._vigilance

    @vigilance.setter
    def vigilance(self, value):
        self._vigilance = _check_unit("vigilance", value)

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value):
        self._beta = _check_unit("beta", value)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value):
        self._alpha = _check_alpha(value)

    @property
    def stored_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def num_categories(self) -> int:
        """Number of categories in use (a host sync)."""
        return int(self.num_committed)

    @property
    def prototypes(self) -> torch.Tensor:
        """The prototypes in use, (num_categories, stored_dim): a view of `weight`, not to be modified."""
        return self.weight[: self.num_categories]

    @property
    def counts(self) -> torch.LongTensor:
        """How many inputs each category in use has taken (a view of `category_counts`)."""
        return self.category_counts[: self.num_categories]

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, rule={self.rule!r}, vigilance={self.vigilance}, beta={self.beta}, alpha={self.alpha}, "
            f"max_categories={self.max_categories}"
        )

    def reset(self) -> None:
        """Forget every category."""
        self.weight.zero_()
        self.category_counts.zero_()
        self.num_committed.zero_()
        self._warned_full = False

    def _params(self) -> dict:
        return {"vigilance": self.vigilance, "beta": self.beta, "alpha": self.alpha}

    def _check_x(self, x) -> torch.Tensor:
        """Validate inputs before anything changes; return them as (N, dim) in the score dtype on our device."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"ARTMemory inputs must be real numbers, got dtype {x.dtype}")
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2:
            raise ValueError(
                f"ARTMemory inputs must have shape (N, {self.dim}) (or ({self.dim},) for one row), got shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[1] != self.dim:
            raise ValueError(f"ARTMemory inputs must have dim={self.dim} features per row, got {x.shape[1]}")
        x = x.to(device=self.weight.device, dtype=_score_dtype(self.weight.device))
        if x.numel():
            if not torch.isfinite(x.sum()):  # one cheap pass; a NaN or Inf anywhere makes the sum non-finite
                finite = torch.isfinite(x).all(-1)
                if not finite.all():
                    bad = (~finite).nonzero()[0].item()
                    raise ValueError(f"ARTMemory inputs must be finite, row {bad} holds NaN or Inf")
            self._rule.check_input(x)
        return x

    def _output(self, category, resonated, rejected, similarity, best) -> ARTOutput:
        status = torch.where(
            resonated, int(ARTStatus.RESONATED), torch.where(rejected, int(ARTStatus.REJECTED), int(ARTStatus.NEW))
        )
        # -inf marks "no category to compare with": similarity 0, novelty 1.
        return ARTOutput(category, status, similarity.nan_to_num(neginf=0.0), 1 - best.nan_to_num(neginf=0.0))

    def _no_category_output(self, n: int, full: bool) -> ARTOutput:
        device = self.weight.device
        none = torch.zeros(n, dtype=torch.bool, device=device)
        scores = torch.full((n,), -math.inf, dtype=_score_dtype(device), device=device)
        return self._output(torch.full((n,), -1, device=device), none, none | full, scores, scores)

    # -----------------------------------------------------------------------------------------------------------------
    # Learning

    @torch.no_grad()
    @_exact_arithmetic
    def update(self, x: torch.Tensor, sync: bool | None = None) -> ARTOutput:
        """
        Learn from the rows of `x` (N, dim) one at a time, in order (docs/design.md#artmemory); report each row.

        Any batch size, and any split of a stream into calls, gives the categories and statuses of the one-at-a-time
        loop (see the module docstring for the arithmetic). Invalid inputs (NaN/Inf, wrong shape, for `fuzzy` values
        outside [0, 1]) raise `ValueError` before anything changes.

        Under `torch.distributed` with several processes (and `sync` not False), the inputs of all ranks are gathered
        in rank order, every rank applies the same update to its copy, and each gets back the rows it passed in:
        the memories stay identical without relying on DDP's buffer broadcast. Every rank must call `update` the
        same number of times (an empty `x` is fine). `sync=True` insists on a process group, `sync=False` updates
        this process alone.
        """
        if sync and not _distributed():
            raise RuntimeError("ARTMemory.update(sync=True) needs an initialised torch.distributed process group")
        if sync is not False and _distributed() and dist.get_world_size() > 1:
            return self._update_distributed(x)
        return self._update(self._check_x(x))

    def _update(self, x: torch.Tensor) -> ARTOutput:
        n = x.shape[0]
        start = self.num_categories  # a host sync: the engines size their work with it
        if n == 0:
            return self._no_category_output(0, False)
        rows = self._rule.prepare_input(x)
        # A working copy (score dtype) of every category this call can reach, plus an overflow row at index `kw` that
        # takes the write of a rejected input. The buffers are written once the call is done.
        kw = min(start + n, self.max_categories)
        # Rows from `start` on are written when their category is created and never read before (left uninitialised:
        # touching them would cost as much as the update's arithmetic).
        w = rows.new_empty(kw + 1, self.stored_dim)
        w[:start], w[kw] = self.weight[:start], 0
        counts = self.category_counts.new_zeros(kw + 1)
        counts[:start] = self.category_counts[:start]
        steps = self._rule.update_rows(w, counts, start, rows, self._params())
        touched = steps.target[steps.target < kw].unique()
        self.weight.index_copy_(0, touched, w.index_select(0, touched).to(self.weight.dtype))
        self.category_counts.index_copy_(0, touched, counts.index_select(0, touched))
        self.num_committed.fill_(steps.committed)

        rejected = steps.target == kw
        if kw == self.max_categories and not self._warned_full and rejected.any():
            self._warned_full = True
            warnings.warn(
                f"ARTMemory is full ({self.max_categories} categories): inputs that resonate with no category are "
                "rejected (status 'rejected', category -1) and nothing learned is overwritten. Raise max_categories "
                "or lower the vigilance to keep learning new categories.",
                stacklevel=3,
            )
        category = torch.where(rejected, -1, steps.target)
        return self._output(category, steps.resonated, rejected, steps.similarity, steps.best)

    def _update_distributed(self, x) -> ARTOutput:
        """Gather every rank's rows in rank order, apply the same update everywhere, return this rank's rows."""
        rank, world = dist.get_rank(), dist.get_world_size()
        error = None
        try:
            x = self._check_x(x)
        except Exception as exc:  # report after the handshake, or the other ranks would wait forever
            error, x = exc, None
        device = torch.device("cpu") if dist.get_backend() == "gloo" else self.weight.device
        n = 0 if x is None else x.shape[0]
        # Handshake: row counts, input validity and a fingerprint of the memory, from every rank.
        state = torch.tensor(
            [
                n,
                error is None,
                self.num_categories,
                self.weight.double().sum().item(),
                self.category_counts.sum().item(),
            ],
            dtype=torch.float64,
            device=device,
        )
        states = [torch.empty_like(state) for _ in range(world)]
        dist.all_gather(states, state)
        states = torch.stack(states).cpu()
        bad = [r for r in range(world) if not states[r, 1]]
        if bad:
            if error is not None:
                raise error
            raise ValueError(
                f"ARTMemory.update: invalid input on rank(s) {bad}; the memory is unchanged on every rank"
            )
        if not (states[:, 2:] == states[0, 2:]).all():
            raise RuntimeError(
                "ARTMemory.update: the memories differ across ranks before the update (categories, prototype sum, "
                f"count sum per rank: {states[:, 2:].tolist()}); load the same state on every rank"
            )
        sizes = states[:, 0].long().tolist()
        longest = max(sizes)
        if longest == 0:
            return self._update(x)
        padded = torch.zeros(longest, self.dim, dtype=x.dtype, device=device)
        padded[:n] = x
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        rows = torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)])
        lo = sum(sizes[:rank])
        return self._update(rows.to(x.device))[lo : lo + n]

    # -----------------------------------------------------------------------------------------------------------------
    # Reads that never learn

    @torch.no_grad()
    @_exact_arithmetic
    def classify(self, x: torch.Tensor) -> ARTOutput:
        """
        What `update` would do with each row of `x` on its own, without learning anything.

        `category` is the resonating category, or -1 where no category passes the vigilance; `status` says what an
        update would do: `RESONATED`, `NEW` (would create a category) or `REJECTED` (would, but the memory is full).
        An empty memory gives category -1, status `NEW`, similarity 0 and novelty 1.
        """
        x = self._check_x(x)
        n, k = x.shape[0], self.num_categories
        full = k >= self.max_categories
        if n == 0 or k == 0:
            return self._no_category_output(n, full)
        rows = self._rule.prepare_input(x)
        w = self.weight[:k].to(rows.dtype)
        per_chunk = max(1, 2**24 // (k * self.stored_dim))  # bounds the (rows, categories, features) scratch
        decided = [self._rule.decide(chunk, w, self._params()) for chunk in rows.split(per_chunk)]
        winner, resonated, similarity, best = (torch.cat(field) for field in zip(*decided, strict=True))
        return self._output(torch.where(resonated, winner, -1), resonated, ~resonated & full, similarity, best)

    def novelty(self, x: torch.Tensor) -> torch.Tensor:
        """1 - best similarity (`cosine`) or 1 - best match (`fuzzy`) of each row; 1 for an empty memory."""
        return self.classify(x).novelty

    # -----------------------------------------------------------------------------------------------------------------
    # Persistence

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool | None = None) -> str | None:
        """
        Write `art_memory.safetensors` into `save_directory` (atomically: a reader sees the old file or the new one).

        Only the main process writes: `is_main_process=None` means rank 0 under `torch.distributed`, else True.
        Returns the file's path, or None where nothing was written.
        """
        if is_main_process is None:
            is_main_process = not _distributed() or dist.get_rank() == 0
        if not is_main_process:
            return None
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, ART_MEMORY_FILE)
        _atomic_write(path, self._to_bytes())
        return path

    def _to_bytes(self) -> bytes:
        k = self.num_categories
        tensors = {
            "prototypes": self.weight[:k].detach().cpu().contiguous(),
            "counts": self.category_counts[:k].detach().cpu().contiguous(),
        }
        metadata = {
            "format": ART_FORMAT,
            "format_version": str(ART_FORMAT_VERSION),
            "rule": self.rule,
            "dim": str(self.dim),
            "vigilance": repr(self.vigilance),
            "beta": repr(self.beta),
            "alpha": repr(self.alpha),
            "max_categories": str(self.max_categories),
            "num_categories": str(k),
        }
        # The data section does not depend on the metadata: hash it once without, then store the hash.
        metadata["sha256"] = hashlib.sha256(_data_section(safetensors_save(tensors))).hexdigest()
        return safetensors_save(tensors, metadata)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str = "",
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str | None = None,
        proxies: dict | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "ARTMemory":
        """
        Load a memory saved with `save_pretrained`, bit-exactly: from a folder, an `art_memory.safetensors` file or a
        Hub repo id (through the HuggingFace cache; the hub arguments are `transformers.utils.cached_file`'s).

        The stored prototype dtype is kept unless `dtype` is given. Damaged, truncated or inconsistent files raise
        `ValueError` naming the file and the problem.
        """
        source = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(source):
            path = source
        elif os.path.isdir(source):
            path = os.path.join(source, subfolder, ART_MEMORY_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no {ART_MEMORY_FILE} in {os.path.join(source, subfolder)}")
        else:
            path = cached_file(
                source,
                ART_MEMORY_FILE,
                subfolder=subfolder,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
                revision=revision,
                proxies=proxies,
            )
        return cls.from_file(path, device=device, dtype=dtype)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "ARTMemory":
        """A new memory with the hyperparameters and state stored in an `art_memory.safetensors` file."""
        config, tensors = load_art_file(path)
        memory = cls(
            config["dim"],
            rule=config["rule"],
            vigilance=config["vigilance"],
            beta=config["beta"],
            alpha=config["alpha"],
            max_categories=config["max_categories"],
            device=device,
            dtype=dtype or tensors["prototypes"].dtype,
        )
        memory._set_state(tensors)
        return memory

    def load_file(self, path: str | os.PathLike) -> "ARTMemory":
        """
        Replace this memory's state with the one stored in `path`.

        The file must be intact and match this memory's rule, dim, vigilance, beta and alpha, and its categories must
        fit in `max_categories` (which may differ); otherwise `ValueError` and the memory is unchanged.
        """
        config, tensors = load_art_file(path)
        mismatched = [
            f"{key} is {config[key]!r} in the file but {mine!r} here"
            for key, mine in (
                ("rule", self.rule),
                ("dim", self.dim),
                ("vigilance", self.vigilance),
                ("beta", self.beta),
                ("alpha", self.alpha),
            )
            if config[key] != mine
        ]
        if config["num_categories"] > self.max_categories:
            mismatched.append(
                f"{config['num_categories']} categories do not fit in max_categories={self.max_categories}"
            )
        if mismatched:
            raise ValueError(f"{os.fspath(path)} does not fit this memory: " + "; ".join(mismatched))
        self._set_state(tensors)
        return self

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        k = tensors["prototypes"].shape[0]
        self.weight.zero_()
        self.weight[:k] = tensors["prototypes"]
        self.category_counts.zero_()
        self.category_counts[:k] = tensors["counts"]
        self.num_committed.fill_(k)
        self._warned_full = False


# ---------------------------------------------------------------------------------------------------------------------
# The file: safetensors with the hyperparameters, the format version and a checksum in its metadata


def _data_section(data: bytes) -> bytes:
    (header_len,) = struct.unpack("<Q", data[:8])
    return data[8 + header_len :]


def _atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, flushed to disk, then renamed over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX; not possible on every platform)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_METADATA_FIELDS = {
    "rule": _check_rule,
    "dim": lambda v: _check_int("dim", int(v)),
    "vigilance": lambda v: _check_unit("vigilance", float(v)),
    "beta": lambda v: _check_unit("beta", float(v)),
    "alpha": lambda v: _check_alpha(float(v)),
    "max_categories": lambda v: _check_int("max_categories", int(v)),
    "num_categories": lambda v: _check_int("num_categories", int(v), minimum=0),
}


def load_art_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """
    Read and check an `art_memory.safetensors` file.

    Returns `(config, tensors)`: `config` holds rule, dim, vigilance, beta, alpha, max_categories and num_categories;
    `tensors` the `prototypes` (num_categories, stored_dim) and `counts` (num_categories,). Anything damaged,
    truncated, missing or inconsistent raises `ValueError` naming the file and the problem.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()

    def problem(message: str) -> ValueError:
        return ValueError(f"{path}: {message}")

    if len(data) < 8:
        raise problem(f"not a safetensors file (only {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise problem("truncated, or not a safetensors file: its header runs past the end of the file")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError:  # includes JSON and UTF-8 decoding errors
        header = None
    if not isinstance(header, dict):
        raise problem("not a safetensors file: unreadable header")
    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise problem(f"damaged or truncated safetensors file ({exc})") from None
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != ART_FORMAT:
        raise problem(f"not an ARTMemory file: its metadata has no format={ART_FORMAT!r}")
    if metadata.get("format_version") != str(ART_FORMAT_VERSION):
        raise problem(
            f"unsupported format version {metadata.get('format_version')!r} (this code reads version "
            f"{ART_FORMAT_VERSION}); upgrade the code that reads it"
        )
    missing = [key for key in (*_METADATA_FIELDS, "sha256") if key not in metadata]
    if missing:
        raise problem(f"metadata lacks {missing}")
    config = {}
    for key, parse in _METADATA_FIELDS.items():
        try:
            config[key] = parse(metadata[key])
        except ValueError as exc:
            raise problem(f"bad metadata {key}={metadata[key]!r}: {exc}") from None
    if hashlib.sha256(_data_section(data)).hexdigest() != metadata["sha256"]:
        raise problem("checksum mismatch: the tensor data is damaged")

    if sorted(tensors) != ["counts", "prototypes"]:
        raise problem(f"expected tensors 'prototypes' and 'counts', found {sorted(tensors)}")
    prototypes, counts = tensors["prototypes"], tensors["counts"]
    k = config["num_categories"]
    expected = (k, ART_RULES[config["rule"]]().stored_dim(config["dim"]))
    if not prototypes.is_floating_point() or tuple(prototypes.shape) != expected:
        raise problem(
            f"prototypes are {prototypes.dtype} of shape {tuple(prototypes.shape)}; expected floats of shape "
            f"{expected} for {k} categories, rule {config['rule']!r} and dim {config['dim']}"
        )
    if counts.dtype != torch.long or tuple(counts.shape) != (k,):
        raise problem(f"counts are {counts.dtype} of shape {tuple(counts.shape)}; expected int64 of shape ({k},)")
    if k > config["max_categories"]:
        raise problem(f"{k} categories exceed max_categories={config['max_categories']}")
    if k and (counts.min() < 1 or not torch.isfinite(prototypes).all()):
        raise problem("categories with a count below 1 or non-finite prototypes")
    if k and config["rule"] == "fuzzy" and (prototypes.min() < 0 or prototypes.max() > 1):
        raise problem("fuzzy prototypes outside [0, 1]")
    return config, tensors
