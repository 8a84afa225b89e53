"""The ART rules, each written as artlib's `BaseART` pieces: `prepare_input`, `choice`, `match` and `learn`.

- `cosine` (default): choice and match are the cosine similarity; the most similar category resonates if its
  similarity is at least the vigilance, and learns `w <- (1 - beta) w + beta x`.
- `fuzzy`: Fuzzy ART (Carpenter, Grossberg & Rosen 1991) on inputs in [0, 1], complement coded `I = [a, 1 - a]`;
  choice `|I ^ w| / (alpha + |w|)`, match `|I ^ w| / |I|`, learning `w <- beta (I ^ w) + (1 - beta) w`.

A new rule is a subclass of `ARTRule` and an entry in `ART_RULES`; the engine (`art_engine.py`) does the rest.
Design: `docs/design.md#artmemory`.
"""

import math
import numbers

import torch

from .art_engine import BlockEngine, CosineEngine, _norm_product, _scratch_buffer, _scratch_elements


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


def _check_alpha(value, name: str = "alpha") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_rule(value) -> str:
    if value not in ART_RULES:
        raise ValueError(f"unknown ART rule {value!r}; expected one of {sorted(ART_RULES)}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Rules


class ARTRule(BlockEngine):
    """
    One ART variant in the shape of artlib's `BaseART`: `prepare_input`, `choice`, `match` and `learn`.

    A rule holds no state. Prototypes are the rows of `w` (K, stored_dim), prepared inputs the rows of `i`
    (n, stored_dim), all in the score dtype; `params` holds the memory's `vigilance`, `beta` and `alpha`. With these
    pieces the generic engine it inherits (`BlockEngine`: `decide` and `update_rows`) is a complete, exact memory, so
    a new rule is a subclass and an entry in `ART_RULES`. A rule may also inherit faster steps that keep the same
    decisions, as `CosineRule` does from `CosineEngine`.
    """

    name = ""
    default_beta = 1.0

    def stored_dim(self, dim: int) -> int:
        """Width of a prototype for inputs of `dim` features."""
        return dim

    def check_input(self, x: torch.Tensor) -> None:
        """Raise `ValueError` for finite inputs the rule cannot take."""

    def check_range(self, low: float, high: float) -> None:
        """Raise `ValueError` if finite inputs between `low` and `high` are not all ones the rule can take."""

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


class CosineRule(CosineEngine, ARTRule):
    """Cosine ART: the most similar prototype resonates if its cosine similarity reaches the vigilance."""

    name = "cosine"
    default_beta = 0.5

    def choice(self, i, w, params):
        similarity = (i @ w.T) / _norm_product(torch.linalg.vecdot(i, i)[:, None], torch.linalg.vecdot(w, w))
        return similarity, similarity

    def match(self, i, w, params, cache):
        return cache

    def learn(self, i, w, params):
        return (1 - params["beta"]) * w + params["beta"] * i


class FuzzyRule(ARTRule):
    """Fuzzy ART on inputs in [0, 1], complement coded; the uncommitted node does not compete (artlib's convention)."""

    name = "fuzzy"
    default_beta = 1.0

    def stored_dim(self, dim):
        return 2 * dim

    def check_input(self, x):
        self.check_range(*(float(v) for v in x.aminmax()))

    def check_range(self, low, high):
        if low < 0 or high > 1:
            raise ValueError(
                f"the fuzzy rule needs inputs in [0, 1], got values in [{low:g}, {high:g}]; map them "
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
