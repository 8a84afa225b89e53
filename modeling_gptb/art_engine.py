"""The exact batched engine behind `ARTMemory.update`: the one-at-a-time loop's decisions, a block of rows at a time.

`BlockEngine` runs any rule written as `choice` / `match` / `learn` (see `art_rules.py`); `CosineEngine` replaces its
steps with faster ones that keep the same decisions. Design: `docs/design.md#the-batched-engine-and-what-exact-means`.

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
  loop's answer (see `BlockEngine.update_rows`). Within a block a prototype's successive values come from a closed form
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
"""

import math
from typing import NamedTuple

import torch

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


class BlockEngine:
    """
    The generic exact engine: the ART search (`decide`) and the block-by-block update (`update_rows`), built on a
    rule's `prepare_input`, `choice`, `match`, `learn` and `commit` (the methods of `ARTRule`, which subclasses this).
    """

    # Blocks grow while guesses hold at the first check and shrink when they need more rounds.
    block_size, min_block_size, max_block_size, max_rounds = 16, 4, 64, 4

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


class CosineEngine(BlockEngine):
    """The engine's steps for cosine ART, at float32 matmul speed: approximate cosines of unit vectors pick the
    candidates, exact float64 cosines decide (see the module docstring); versions come from a closed form of each
    chain."""

    block_size, min_block_size, max_block_size, max_rounds = 32, 8, 128, 4

    def decide(self, i, w, params, valid=None):
        # Choice and match are the same score, so the search is an argmax (made exact by `_exact_argmax`).
        dtype, tolerance = _approx_dtype(i)
        scores = _unit(i, dtype) @ _unit(w, dtype).T
        if valid is not None:
            scores = scores.masked_fill(~valid, -math.inf)
        winner, _, similarity, _ = _decide_cosine(i, torch.linalg.vecdot(i, i), scores, tolerance, _Seen(w))
        return _Decisions(winner, similarity >= params["vigilance"], similarity, similarity)

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
