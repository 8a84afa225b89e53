"""The ART update without host synchronisation: the one-at-a-time loop's decisions, a fixed-size window of rows at a
time, with every data-dependent quantity (the rows done, the categories in use) kept in device tensors.

`ARTMemory.update` runs it for `engine="device"` (the default on CUDA). Design: `docs/design.md#the-device-engine`.

A host synchronisation (`.item()`, `int(t)`, `bool(t)`, `.tolist()`, `nonzero()`, a shape or a Python loop that
depends on tensor values) stalls a GPU until the work queued before it is done, and the block engine (`art_engine.py`)
has several per block. Here the only host read is `_read_back`, once per call after all the windows are queued: it
tells whether the windows reached the last row (else more are queued and it reads again; see `update_rows`), the
categories in use, whether a row was rejected, and the input checks.

Each step decides a window of `window` rows that starts at the first row not yet done (`start`, a device tensor):

1. Score the window's rows against the memory as it is (the first guess).
2. `rounds` times: from the guess, compute each row's category right after the row's update (`depth` steps of the
   rule's own `learn` along the chains of rows that update the same category), then decide every row again against
   the prototypes its predecessors (under the guess) leave; that check is the next guess.
3. The rows before the first disagreement between the last guess and its check are the loop's answer (a row checked
   against right predecessors is right; see `art_engine.BlockEngine.update_rows`), unless an earlier row sits deeper
   than `depth` in its chain (its version is not computed yet): commit them, and advance `start` by their number.

At least one row is done per step (the window's first row is decided against the memory as it is), typically all
`window`. The number of steps queued is static: enough for full windows plus a margin (`slack`).
"""

import math

import torch

from .art_engine import BlockEngine, CosineEngine, _cosine


def _read_back(values: torch.Tensor) -> list:
    """The one host read of an update call (a function of its own, so that tests can tell it from any other)."""
    return values.tolist()


class DeviceEngine:
    """The window-by-window update of `rule` (an `ARTRule`): `update_rows` works with device tensors alone."""

    window, rounds, depth, slack = 64, 3, 4, 0.25

    def __init__(self, rule: BlockEngine):
        self.rule = rule
        self.cosine = isinstance(rule, CosineEngine)

    def update_rows(self, w, counts, k, rows, params, k_bound: int, extra: torch.Tensor, check=None):
        """
        Learn from `rows` (n, stored_dim; prepared inputs, score dtype) one at a time, in order, in place.

        `w` (kw + 1, stored_dim) holds the categories, the first `k` (a 0-d long device tensor) of them in use, and
        an overflow row kw that takes the write of a rejected input (and the writes that are discarded); `counts`
        (kw + 1,) is laid out alike. `k_bound`, a host-side upper bound on `k`, sizes the columns scored.

        The host read at the end also returns `extra` (a 1-d device tensor, e.g. input checks), passed to `check`
        first, which may raise. Returns the target (kw: rejected), resonance, similarity and best score of each row
        (device tensors), the categories in use after the rows as read, whether a row was rejected, and `extra`.
        """
        n, m, kw = rows.shape[0], self.window, w.shape[0] - 1
        state = _State(rows, m, kw, k)
        steps, left, rate = 0, n, m  # rate: rows done per step, m until a read tells
        while left:  # once, unless the windows queued fell short of the last row (then again for the rest)
            for _ in range(math.ceil(left / rate * (1 + self.slack))):
                # rows done by the end of this step: at most (steps + 1) * m, so the categories in use fit below
                self._step(state, w, counts, params, min(k_bound + (steps + 1) * m, kw))
                steps += 1
            rejected = (state.out[0][:n] == kw).any()
            values = _read_back(torch.cat([torch.stack([state.start, state.k, rejected]).double(), extra.double()]))
            if check is not None:
                check(values[3:])
            left = n - int(values[0])
            rate = max((n - left) / steps, 1.0)
        return (*(out[:n] for out in state.out), int(values[1]), bool(values[2]), values[3:])

    def _step(self, s, w, counts, params, kb):
        m, kw, n = s.m, s.kw, s.n
        j = s.j
        index = s.start + j  # rows of this window (past n: padding, never committed)
        x = s.rows.index_select(0, index)
        # Block-start scores against the categories 0..kb-1, with a last column that is never a category (-inf), for
        # the writes of rows that change no category
        in_use = torch.arange(kb + 1, device=x.device) < s.k
        start_scores = [
            torch.nn.functional.pad(part, (0, 1)).masked_fill(~in_use, -math.inf)
            for part in self._scores(x, w[:kb], params)
        ]
        winner, resonated = self._decide(x, w, start_scores, params, None)[:2]
        for _ in range(self.rounds):
            target, chains, versions, deep = self._versions(s, w, x, winner, resonated, params)
            checked = self._decide(
                x,
                w,
                self._merge(x, start_scores, target, chains, versions, params, kb),
                params,
                (chains, target, versions),
            )
            agree = (checked[1] == resonated) & (~resonated | (checked[0] == winner))
            guessed = resonated
            winner, resonated = checked[:2]
        # Rows before the first disagreement are right; a row's version is right if its chain position <= depth.
        wrong = ~agree | deep  # a deep row's version is not computed yet: it and the rows after it wait
        done = torch.where(wrong.any(), wrong.int().argmax(), m)
        done = torch.minimum(done, n - s.start)
        committed = j < done
        applies = committed & chains.applies
        # Each category the committed rows touched takes the last committed version of its chain.
        last = applies & (chains.following >= done)
        w.index_copy_(0, torch.where(last, target, kw), versions)
        counts.index_add_(0, torch.where(applies, target, kw), torch.ones_like(target))
        s.k = (s.k + (committed & ~guessed).sum()).clamp_max(kw)
        slot = torch.where(committed, index, n)  # row n of the outputs takes the rows not done
        for out, value in zip(s.out, (target, guessed, checked[2], checked[3]), strict=True):
            out.index_copy_(0, slot, value)
        s.start = s.start + done

    def _scores(self, x, w, params) -> tuple:
        """(choice, match) of each row of `x` against each of `w`; for cosine, where both are the cosine, (cosine,):
        one float64 matmul, not in the row chunks that bound an element-wise rule's scratch."""
        if self.cosine:
            return (self.rule.choice(x, w, params)[0],)
        return self.rule._scores(x, w, params)

    def _decide(self, x, w, scores, params, seen):
        """Winner, resonance, similarity and best score of each row from its merged (choice, match) scores."""
        if not self.cosine:
            return BlockEngine._search(*scores, params)
        # cosine: the winner is the argmax of the float64 cosines (ties to the lowest index); its similarity is the
        # exact cosine of the row and the prototype it sees, so that a row equal to a prototype scores exactly 1.0
        winner = scores[0].argmax(1)
        best = scores[0].gather(1, winner[:, None]).squeeze(1)
        prototype = w.index_select(0, winner)
        if seen is not None:  # the version left by an earlier row of the window, where one touched the winner
            chains, target, versions = seen
            source = torch.where(chains.current & (target[None, :] == winner[:, None]), chains.j, -1).amax(1)
            prototype = torch.where((source >= 0)[:, None], versions.index_select(0, source.clamp_min(0)), prototype)
        similarity = _cosine(x, prototype).masked_fill(torch.isneginf(best), -math.inf)
        return winner, similarity >= params["vigilance"], similarity, similarity

    def _versions(self, s, w, x, winner, resonated, params):
        """Targets under a guess, its chains, each row's category right after the row's update, and which rows sit
        deeper than `depth` in their chain."""
        missed = ~resonated
        target = torch.where(resonated, winner, (s.k + missed.cumsum(0) - missed.long()).clamp_max(s.kw))
        chains = _Chains(target, s.kw, s.j)
        start = w.index_select(0, target)  # the prototype at the window's start (garbage for a new category)
        created = self.rule.commit(x, params)
        before = start
        for _ in range(self.depth):  # versions along each chain, one link per pass: the loop's own arithmetic
            versions = torch.where(resonated[:, None], self.rule.learn(x, before, params), created)
            before = torch.where(
                (chains.previous >= 0)[:, None], versions.index_select(0, chains.previous.clamp_min(0)), start
            )
        return target, chains, versions, chains.position > self.depth

    def _merge(self, x, start_scores, target, chains, versions, params, kb):
        """Each row's (choice, match) against the categories as its predecessors leave them: the block-start score,
        or where an earlier row of the window updated the category, the score of its latest version."""
        m = x.shape[0]
        columns = torch.where(chains.applies, target, kb).clamp_max(kb)[None, :].expand(m, m)
        first_touch = torch.full((kb + 1,), m, device=x.device).scatter_reduce(
            0, columns[0], torch.where(chains.applies, chains.j, m), "amin"
        )
        touched_before = first_touch[None, :] < chains.j[:, None]
        merged = []
        for block_start, current in zip(start_scores, self._scores(x, versions, params), strict=True):
            scores = block_start.masked_fill(touched_before, -math.inf)
            merged.append(scores.scatter_reduce(1, columns, current.masked_fill(~chains.current, -math.inf), "amax"))
        return merged


class _State:
    """What the steps of one call share: the window position, the categories in use and the outputs (device)."""

    def __init__(self, rows, m, kw, k):
        n, device = rows.shape[0], rows.device
        self.n, self.m, self.kw, self.k = n, m, kw, k.clone()
        self.rows = torch.cat([rows, rows.new_zeros(m, rows.shape[1])])  # a window past the end reads zeros
        self.j = torch.arange(m, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        # target, resonated, similarity, best; row n collects the writes of rows not done
        self.out = (
            torch.full((n + 1,), kw, dtype=torch.long, device=device),
            torch.zeros(n + 1, dtype=torch.bool, device=device),
            rows.new_full((n + 1,), -math.inf),
            rows.new_full((n + 1,), -math.inf),
        )


class _Chains:
    """For the targets of a window's rows (`kw`: none), which rows update the same category (all dense, (m, m))."""

    def __init__(self, target, kw, j):
        self.j = j
        m = j.shape[0]
        self.applies = target != kw
        same = (target[:, None] == target[None, :]) & self.applies[:, None] & self.applies[None, :]
        before = j[None, :] < j[:, None]  # [r, u]: u comes before r
        self.previous = torch.where(same & before, j[None, :], -1).amax(1)  # last earlier row on r's category
        self.position = (same & (before | (j[None, :] == j[:, None]))).sum(1)  # 1: first of its chain
        self.following = torch.where(same & before.T, j[None, :], m).amin(1)  # next row on r's category (m: none)
        # current[r, u]: row u's version is its category's prototype when row r arrives
        self.current = self.applies[None, :] & before & (j[:, None] <= self.following[None, :])
