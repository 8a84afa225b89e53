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

The pieces: the rules in `art_rules.py`, the exact batched engine in `art_engine.py`, the same decisions without host
synchronisation (for GPUs) in `art_device_engine.py`, the file format in `art_file.py`. These files travel to the Hub
as remote code: they import only the standard library, torch, transformers, safetensors and each other.
"""

import enum
import functools
import math
import os
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import cached_file

from .art_device_engine import DeviceEngine
from .art_engine import _score_dtype
from .art_file import (
    ART_FORMAT,
    ART_FORMAT_VERSION,
    ART_MEMORY_FILE,
    NOVELTY_BINS,
    NOVELTY_RANGE,
    UnpairedARTFileWarning,
    _atomic_write,
    check_weights_sha256,
    encode_art_file,
    load_art_file,
)
from .art_rules import (
    ART_RULES,
    ARTRule,
    CosineRule,
    FuzzyRule,
    _check_alpha,
    _check_int,
    _check_rule,
    _check_unit,
    to_unit_interval,
)

# ART_MAX_BUFFER_BYTES: what `ARTMemory.from_pretrained` may allocate for a file's buffers unless the caller allows
# more (1 GiB); a GPTBConfig's art_max_categories is held to the same bound.
from .configuration_gptb import ART_EXEMPLAR_TOKENS, ART_MAX_BUFFER_BYTES, art_buffer_bytes, art_rule_dim
from .outlier_exposure import fit_linear_probe

# The values of `ARTMemory.engine`. "auto" is the block engine everywhere until the device engine is measured faster.
ART_ENGINES = ("auto", "block", "device")

# What the rule sees of an input row x (docs/design.md#what-the-memory-sees): "none", x itself; "center", x - c;
# "euclidean", [(x - c) / s, lift], whose cosine is 1 - |x - y|^2 / (2 s^2 lift^2) to first order, so the cosine rule
# decides by Euclidean distance; "standardize", [(x - c) / sigma / s, lift], the same on per-dimension standardised
# rows. c, sigma (the per-dimension standard deviation, ones but for "standardize") and s (the RMS distance of the
# scaled rows to c) are fitted by `fit_input_transform`.
ART_INPUT_TRANSFORMS = ("none", "center", "euclidean", "standardize")
# "standardize": a dimension whose standard deviation is below this share of the RMS standard deviation is divided by
# that floor instead, so a constant dimension (or one nearly so) is not blown up into noise or a division by zero.
DIM_SCALE_FLOOR = 1e-3
# The scores a verdict can use (docs/design.md#calibrated-verdict): the memory's novelty; "combined", its z-score plus
# the surprise's; "outliers", w_n z(novelty) + w_s z(surprise) + w_o max(z(outlier probe), 0), with the weights of
# OUTLIER_SCORE_WEIGHTS (chosen on validation sets by `gptb experiment novelty`'s probes; the probe counts only above
# its in-domain mean, so text it finds more familiar than in-domain text is not made less novel).
VERDICT_SCORES = ("novelty", "combined", "outliers")
OUTLIER_SCORE_WEIGHTS = {"novelty": 1.0, "surprise": 0.5, "outliers": 2.0}
# `calibration` holds: the false-positive rate, the novelty threshold, the combined score's threshold, the mean and
# standard deviation of the calibration novelty and surprise (0 without surprise), the rows (0: not calibrated), the
# score in use (its index in VERDICT_SCORES) and the mean and standard deviation of the outlier probe's score (0 but
# for "outliers"). Zeros, not NaN, mark what is absent, so that states compare equal. Files before format 5 hold the
# first nine.
_CALIBRATION_FIELDS = ("fpr", "threshold", "combined_threshold", "novelty_mean", "novelty_std", "surprise_mean",
                       "surprise_std", "rows", "score", "outliers_mean", "outliers_std")  # fmt: skip
CALIBRATION_QUANTILES = 101  # novelty (and the combined score) at 0, 1, ..., 100 percent of the calibration rows


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


def _serialised(method):
    """Hold the memory's lock: an update reads and rewrites the whole state, so two at once would lose one."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class ARTStatus(enum.IntEnum):
    """What a memory did (or, for `classify`, would do) with an input: the codes in `ARTOutput.status`."""

    RESONATED = 0  # matched a category, which learned from the input
    NEW = 1  # matched nothing: a new category was created
    REJECTED = 2  # matched nothing and the memory is full: nothing was learned

    def __str__(self) -> str:
        return self.name.lower()


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

    _REPR_ROWS = 8  # rows shown by repr (not a field: no annotation)

    def status_names(self) -> list[str]:
        """The status of each row as a name: "resonated", "new" or "rejected"."""
        return [ARTStatus(code).name.lower() for code in self.status.tolist()]

    def __len__(self) -> int:
        return self.category.shape[0]

    def __repr__(self) -> str:
        # statuses by name: bare codes (0, 1, 2) mean nothing to a reader; long outputs show their first rows
        shown = self[: self._REPR_ROWS]
        more = f", ... {len(self)} rows" if len(self) > self._REPR_ROWS else ""
        return (
            f"ARTOutput(category={shown.category.tolist()}, status={shown.status_names()}, "
            f"similarity={[round(value, 4) for value in shown.similarity.tolist()]}, "
            f"novelty={[round(value, 4) for value in shown.novelty.tolist()]}{more})"
        )

    def __getitem__(self, index) -> "ARTOutput":
        """The output of a subset of the rows (an int, slice, mask or index tensor)."""
        if isinstance(index, int):
            index = [index]
        return ARTOutput(self.category[index], self.status[index], self.similarity[index], self.novelty[index])


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
        input_transform (`str`, defaults to `"none"`): what the rule sees of each input row, one of
            `ART_INPUT_TRANSFORMS` (docs/design.md#what-the-memory-sees); all but `"none"` need
            `fit_input_transform` first and the `cosine` rule.
        lift (`float`, defaults to 4.0): the constant coordinate `"euclidean"` and `"standardize"` append, in units
            of the fitted RMS distance; larger makes the cosine closer to the Euclidean distance (> 0, finite).
        engine (`str`, defaults to `"auto"`): how `update` computes: `"block"`, the block engine (`art_engine.py`);
            `"device"`, the engine without host synchronisation (`art_device_engine.py`); `"auto"`, the block engine
            until the device engine is measured faster on a GPU. The decisions are the same
            (docs/design.md#the-device-engine).
        device, dtype: of the prototype buffer. `dtype` defaults to float64 where that is torch's default float dtype,
            else float32: a model built under a bf16 or fp16 default (`from_pretrained(..., dtype=torch.bfloat16)`)
            still gets float32 prototypes.

    The state is fixed-capacity buffers, so it lives in a parent model's `state_dict` and comes back with
    `load_state_dict` (how `Trainer` resumes): `weight` (max_categories, stored_dim) with the prototypes in its first
    `num_committed` rows, `category_counts` (max_categories,), `num_committed` (a 0-d long tensor) and
    `novelty_histogram`. `stored_dim` is `rule_dim` for `cosine` and `2 * rule_dim` for `fuzzy` (complement coding).
    The fitted input transform, the outlier probe, the calibration and the category descriptions are buffers outside
    the `state_dict`, saved in the ART file (`save_pretrained`). The memory follows `.to(device)`, but keeps its
    prototypes' dtype through `.to(dtype)`, `.half()`, `.bfloat16()` and the like, on it or on a parent model (as
    transformers keeps `_keep_in_fp32_modules` in float32): casting a model to bf16 does not round what the memory has
    learned. Choose the dtype when building the memory (or with `from_pretrained(..., dtype=...)`). Scores are
    computed in float64 whatever the buffer dtype. A load refuses stored prototypes that this dtype would round or
    overflow.

    Thread-safe: `update`, `classify`, `load_file` and `reset` hold the memory's lock, so calls from several threads
    run one after another, in the order they take the lock.
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
        input_transform: str = "none",
        lift: float = 4.0,
        engine: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.engine = engine
        self.dim = _check_int("dim", dim)
        self._rule = ART_RULES[_check_rule(rule)]()
        capacity = _check_int("max_categories", max_categories)
        self.vigilance = vigilance
        self.beta = self._rule.default_beta if beta is None else beta
        self.alpha = alpha
        if input_transform not in ART_INPUT_TRANSFORMS:
            raise ValueError(f"input_transform must be one of {list(ART_INPUT_TRANSFORMS)}, got {input_transform!r}")
        if input_transform != "none" and self.rule != "cosine":
            raise ValueError(f"input_transform={input_transform!r} needs rule='cosine' (fuzzy inputs lie in [0, 1])")
        self._input_transform = input_transform
        self.lift = _check_alpha(lift, "lift")
        if dtype is None:
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        shape = (capacity, self._rule.stored_dim(self.rule_dim))
        self.register_buffer("weight", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("category_counts", torch.zeros(capacity, device=device, dtype=torch.long))
        self.register_buffer("num_committed", torch.zeros((), device=device, dtype=torch.long))
        self.register_buffer("novelty_histogram", torch.zeros(NOVELTY_BINS, device=device, dtype=torch.long))
        # The fitted input transform (scale 0: not fitted), the calibration (float64 but on MPS, so that thresholds and
        # the fpr read back as computed) and what describes each category travel in the ART file, not the state_dict:
        # model folders saved before they existed keep loading.
        exact = torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64
        extra = {
            "input_center": torch.zeros(self.dim, device=device, dtype=dtype),
            "input_scale": torch.zeros((), device=device, dtype=dtype),
            "input_dim_scale": torch.ones(self.dim, device=device, dtype=dtype),
            "calibration": torch.zeros(len(_CALIBRATION_FIELDS), device=device, dtype=exact),
            "calibration_quantiles": torch.zeros((2, CALIBRATION_QUANTILES), device=device, dtype=exact),
            # the outlier probe (`fit_outlier_exposure`): center, scale (0: not fitted) and weight rows, and the bias
            "outlier_probe": torch.zeros((3, self.dim), device=device, dtype=exact),
            "outlier_bias": torch.zeros((), device=device, dtype=exact),
            "rows_seen": torch.zeros((), device=device, dtype=torch.long),
            "category_created": torch.full((capacity,), -1, device=device, dtype=torch.long),
            "category_exemplars": torch.full((capacity, ART_EXEMPLAR_TOKENS), -1, device=device, dtype=torch.long),
        }
        for name, tensor in extra.items():
            self.register_buffer(name, tensor, persistent=False)
        self._warned_full = False
        self._committed_seen = None
        self._remember_committed(0)
        self._lock = threading.RLock()  # see _serialised

    def __getstate__(self):  # a copy or pickle gets a lock of its own
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    def _apply(self, fn, recurse=True):
        """Apply `fn` (a move or cast from `.to()`, `.cuda()`, `.half()`, `to_empty()`, ...) to the buffers, without
        changing the prototypes' dtype: a cast becomes a move to the device `fn` targets."""

        def keep_dtype(tensor):
            target = fn(tensor.new_empty(0))  # where and in what dtype `fn` puts a tensor, without copying this one
            if target.dtype == tensor.dtype:
                return fn(tensor)
            return tensor.to(device=target.device)

        return super()._apply(keep_dtype, recurse)

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

    @property
    def engine(self) -> str:
        """How `update` computes: "auto", "block" or "device" (see the constructor)."""
        return self._engine

    @engine.setter
    def engine(self, value):
        if value not in ART_ENGINES:
            raise ValueError(f"engine must be one of {list(ART_ENGINES)}, got {value!r}")
        self._engine = value

    def _device_engine(self) -> bool:
        # Unmeasured on GPUs and 0.2x the block engine on a CPU, so "auto" does not pick it yet.
        return self.engine == "device"

    def _remember_committed(self, value: int) -> None:
        """Note `num_committed`'s value for the host, keyed by the tensor's storage and version counter: any change
        made elsewhere (`load_state_dict`, `reset`, ...) bumps the version, so the note is then read again."""
        self._committed_seen = (self._committed_key(), value)

    def _committed_key(self):
        tensor = self.num_committed
        try:
            return tensor.device, tensor.data_ptr(), tensor._version
        except RuntimeError:  # inference tensors have no version counter
            return None

    def _host_committed(self) -> int:
        """`num_committed` on the host, without a device read where the last update left it as noted."""
        key = self._committed_key()
        if key is None or self._committed_seen is None or self._committed_seen[0] != key:
            self._remember_committed(int(self.num_committed))  # a host sync
        return self._committed_seen[1]

    @alpha.setter
    def alpha(self, value):
        self._alpha = _check_alpha(value)

    @property
    def stored_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def input_transform(self) -> str:
        """What the rule sees of a row (fixed at construction: it sets the prototypes' width)."""
        return self._input_transform

    @property
    def rule_dim(self) -> int:
        """Features of a row after the input transform: `dim`, plus the lift coordinate for `"euclidean"` and
        `"standardize"`."""
        return art_rule_dim(self.dim, self.input_transform)

    @property
    def input_fitted(self) -> bool:
        """Whether `fit_input_transform` has set the center and scale (a host sync)."""
        return bool(self.input_scale > 0)

    @property
    def calibrated(self) -> bool:
        """Whether `calibrate` has set the novelty threshold (a host sync)."""
        return bool(self.calibration[_CALIBRATION_FIELDS.index("rows")] > 0)

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
        transform = "" if self.input_transform == "none" else f", input_transform={self.input_transform!r}"
        return (
            f"dim={self.dim}, rule={self.rule!r}, vigilance={self.vigilance}, beta={self.beta}, alpha={self.alpha}, "
            f"max_categories={self.max_categories}{transform}"
        )

    @_serialised
    def reset(self) -> None:
        """Forget every category and the calibration (made against them); a fitted input transform and outlier probe
        stay."""
        self.weight.zero_()
        self.category_counts.zero_()
        self.num_committed.zero_()
        self.novelty_histogram.zero_()
        self.calibration.zero_()
        self.calibration_quantiles.zero_()
        self.rows_seen.zero_()
        self.category_created.fill_(-1)
        self.category_exemplars.fill_(-1)
        self._warned_full = False

    def _params(self) -> dict:
        return {"vigilance": self.vigilance, "beta": self.beta, "alpha": self.alpha}

    def _check_x(self, x, check_values: bool = True, transform: bool = True) -> torch.Tensor:
        """Validate inputs before anything changes; return them as (N, dim) in the score dtype on our device.

        Rows with NaN or Inf, or with values the prototypes' dtype cannot hold, are refused: a learned row would store
        them, and a memory holding Inf is one no file can carry. `check_values=False` leaves the values unchecked
        (shapes and dtypes only) for the device engine, which checks them in its one host read (`_value_report`).
        With `transform`, the rows come back through the input transform (rule_dim features)."""
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
        if x.numel() and check_values:
            if not torch.isfinite(x.sum()):  # one cheap pass; a NaN or Inf anywhere makes the sum non-finite
                finite = torch.isfinite(x).all(-1)
                if not finite.all():
                    self._value_error(0, (~finite).nonzero()[0].item())
            dtype = self.weight.dtype
            if not torch.isfinite(x.abs().amax().to(dtype)):  # a value the prototypes' dtype rounds to infinity
                self._value_error(1, (~torch.isfinite(x.to(dtype)).all(-1)).nonzero()[0].item())
            self._rule.check_input(x)
        return self._transformed(x) if transform else x

    def _transformed(self, x: torch.Tensor) -> torch.Tensor:
        """What the rule sees of checked rows (docs/design.md#what-the-memory-sees)."""
        if self.input_transform == "none":
            return x
        if not self.input_fitted:
            raise ValueError(
                f"input_transform={self.input_transform!r} is not fitted: call fit_input_transform(x) with "
                "in-domain rows first (for a model: train with art_input_transform='none', then "
                "modeling_gptb.art_report.fit_art_memory(model, ids, input_transform=...))"
            )
        x = x - self.input_center.to(x.dtype)
        if self.input_transform == "center":
            return x
        x = x / self.input_dim_scale.to(x.dtype)  # ones but for "standardize": exact, "euclidean" is unchanged
        return torch.cat([x / self.input_scale.to(x.dtype), x.new_full((x.shape[0], 1), self.lift)], dim=1)

    def _value_report(self, x: torch.Tensor) -> torch.Tensor:
        """`_check_x`'s value checks as device values, read with the device engine's one host read: the first row
        holding NaN or Inf and the first the prototypes' dtype cannot hold (-1: none), the least and largest value."""

        def first(bad_rows):
            return torch.where(bad_rows.any(), bad_rows.int().argmax(), -1)

        low, high = x.aminmax()
        bad = (~torch.isfinite(x).all(-1), ~torch.isfinite(x.to(self.weight.dtype)).all(-1))
        return torch.cat([torch.stack([first(bad[0]), first(bad[1])]).to(x.dtype), torch.stack([low, high])])

    def _check_report(self, values: list) -> None:
        """Raise for what `_value_report` found, as `_check_x` would."""
        for kind in (0, 1):
            if values[kind] >= 0:
                self._value_error(kind, int(values[kind]))
        self._rule.check_range(values[2], values[3])

    def _value_error(self, kind: int, row: int):
        if kind == 0:
            raise ValueError(f"ARTMemory inputs must be finite, row {row} holds NaN or Inf")
        dtype = self.weight.dtype
        raise ValueError(
            f"ARTMemory inputs must fit the prototypes' dtype {dtype} (magnitudes up to {torch.finfo(dtype).max:g}), "
            f"row {row} does not"
        )

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

    @_serialised
    @torch.no_grad()
    @_exact_arithmetic
    def update(self, x: torch.Tensor, sync: bool | None = None, exemplars: torch.Tensor | None = None) -> ARTOutput:
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

        `exemplars` (`torch.LongTensor` of shape `(N, L)`, *optional*): what each row stands for (a model passes the
        first tokens of each sequence; -1 pads), kept for the categories rows create (the first
        `ART_EXEMPLAR_TOKENS`) to describe them (`describe_category`).
        """
        if sync and not _distributed():
            raise RuntimeError("ARTMemory.update(sync=True) needs an initialised torch.distributed process group")
        if sync is not False and _distributed() and dist.get_world_size() > 1:
            return self._update_distributed(x, exemplars)
        exemplars = self._check_exemplars(x, exemplars)
        if self._device_engine():
            return self._update(self._check_x(x, check_values=False), check_values=True, exemplars=exemplars)
        return self._update(self._check_x(x), exemplars=exemplars)

    def _check_exemplars(self, x, exemplars) -> torch.Tensor | None:
        """`exemplars` as (N, ART_EXEMPLAR_TOKENS) longs on our device (-1 pads), or None."""
        if exemplars is None:
            return None
        shape = torch.as_tensor(x).shape
        rows = shape[0] if len(shape) == 2 else 1
        if not isinstance(exemplars, torch.Tensor) or exemplars.dtype != torch.long or exemplars.ndim != 2:
            raise ValueError(f"exemplars must be a torch.long tensor of shape (N, L), got {exemplars!r:.80}")
        if exemplars.shape[0] != rows:
            raise ValueError(f"exemplars must have one row per input row ({rows}), got {exemplars.shape[0]}")
        kept = exemplars[:, :ART_EXEMPLAR_TOKENS].to(self.weight.device)
        return torch.nn.functional.pad(kept, (0, ART_EXEMPLAR_TOKENS - kept.shape[1]), value=-1)

    def _update(self, x: torch.Tensor, check_values: bool = False, exemplars=None) -> ARTOutput:
        """Learn from rows checked by `_check_x` (with `check_values`: rows whose values the device engine checks)."""
        n = x.shape[0]
        if n == 0:
            return self._no_category_output(0, False)
        if self._device_engine():
            return self._update_on_device(x, check_values, exemplars)
        start = self.num_categories  # a host sync: the engines size their work with it
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
        return self._finish(steps.target, steps.resonated, steps.similarity, steps.best, kw, exemplars=exemplars)

    def _update_on_device(self, x: torch.Tensor, check_values: bool, exemplars=None) -> ARTOutput:
        """`_update` by the device engine: no host sync but its one read (docs/design.md#the-device-engine)."""
        n, start = x.shape[0], self._host_committed()
        rows = self._rule.prepare_input(x)
        kw = min(start + n, self.max_categories)  # as in `_update`: the rows this call can reach, and an overflow row
        # zeros past `start`: the engine scores rows that are not categories yet (then masks them), and garbage there
        # (denormals) would slow every operation down
        w = rows.new_zeros(kw + 1, self.stored_dim)
        w[:start] = self.weight[:start]
        counts = self.category_counts.new_zeros(kw + 1)
        counts[:start] = self.category_counts[:start]
        report = self._value_report(x) if check_values else x.new_empty(0)
        target, resonated, similarity, best, committed, rejected, _ = DeviceEngine(self._rule).update_rows(
            w, counts, self.num_committed, rows, self._params(), start, report, self._check_report
        )
        # Rows below `start` go back as they came (a float64 copy of the buffer's values rounds back to them).
        self.weight[:committed] = w[:committed].to(self.weight.dtype)
        self.category_counts[:committed] = counts[:committed]
        self.num_committed.fill_(committed)
        self._remember_committed(committed)
        return self._finish(target, resonated, similarity, best, kw, rejected, exemplars)

    def _finish(self, target, resonated, similarity, best, kw, any_rejected=None, exemplars=None) -> ARTOutput:
        """The output of an update whose rows went to `target` (kw: rejected); warns at the first rejection."""
        rejected = target == kw
        if (
            kw == self.max_categories
            and not self._warned_full
            and (rejected.any() if any_rejected is None else any_rejected)
        ):
            self._warned_full = True
            warnings.warn(
                f"ARTMemory is full ({self.max_categories} categories): inputs that resonate with no category are "
                "rejected (status 'rejected', category -1) and nothing learned is overwritten. Raise max_categories "
                "or lower the vigilance to keep learning new categories.",
                stacklevel=4,
            )
        category = torch.where(rejected, -1, target)
        output = self._output(category, resonated, rejected, similarity, best)
        self.novelty_histogram.index_add_(0, _novelty_bins(output.novelty), torch.ones_like(category))
        self._record_creations(output, exemplars)
        return output

    def _record_creations(self, output: ARTOutput, exemplars) -> None:
        """Note when each new category was created (rows learned before it) and its exemplar, without a host sync:
        rows that created nothing write to a spare row past the buffers."""
        n = len(output)
        spare = torch.where(output.status == int(ARTStatus.NEW), output.category, self.max_categories)
        for buffer, values in (
            (self.category_created, self.rows_seen + torch.arange(n, device=self.rows_seen.device)),
            (self.category_exemplars, exemplars),
        ):
            if values is None:
                continue
            extended = torch.cat([buffer, buffer[:1]])
            extended.index_put_((spare.to(buffer.device),), values.to(buffer.device))
            buffer.copy_(extended[:-1])
        self.rows_seen.add_(n)

    def _update_distributed(self, x, exemplars=None) -> ARTOutput:
        """Gather every rank's rows in rank order, apply the same update everywhere, return this rank's rows."""
        rank, world = dist.get_rank(), dist.get_world_size()
        error = None
        try:
            exemplars = self._check_exemplars(x, exemplars)
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

        def gather(values: torch.Tensor, fill) -> torch.Tensor:
            padded = torch.full((longest, values.shape[1]), fill, dtype=values.dtype, device=device)
            padded[:n] = values
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(x.device)

        # every rank passes exemplar rows (-1 where it has none), so that the collectives match
        if exemplars is None:
            exemplars = torch.full((n, ART_EXEMPLAR_TOKENS), -1, dtype=torch.long, device=x.device)
        lo = sum(sizes[:rank])
        return self._update(gather(x, 0.0), exemplars=gather(exemplars, -1))[lo : lo + n]

    # -----------------------------------------------------------------------------------------------------------------
    # Reads that never learn

    @_serialised
    @torch.no_grad()
    @_exact_arithmetic
    def classify(self, x: torch.Tensor) -> ARTOutput:
        """
        What `update` would do with each row of `x` on its own, without learning anything.

        `category` is the resonating category, or -1 where no category passes the vigilance; `status` says what an
        update would do: `RESONATED`, `NEW` (would create a category) or `REJECTED` (would, but the memory is full).
        An empty memory gives category -1, status `NEW`, similarity 0 and novelty 1.
        """
        decided = self._decide(x)
        if isinstance(decided, ARTOutput):
            return decided
        winner, resonated, similarity, best = decided
        full = self.num_categories >= self.max_categories
        return self._output(torch.where(resonated, winner, -1), resonated, ~resonated & full, similarity, best)

    def _decide(self, x):
        """The rule's decision for each row against the memory as it is: (winner, resonated, similarity, best), or
        the output for an empty memory or no rows."""
        x = self._check_x(x)
        n, k = x.shape[0], self.num_categories
        if n == 0 or k == 0:
            return self._no_category_output(n, k >= self.max_categories)
        rows = self._rule.prepare_input(x)
        w = self.weight[:k].to(rows.dtype)
        per_chunk = max(1, 2**24 // (k * self.stored_dim))  # bounds the (rows, categories, features) scratch
        decided = [self._rule.decide(chunk, w, self._params()) for chunk in rows.split(per_chunk)]
        return tuple(torch.cat(field) for field in zip(*decided, strict=True))

    @torch.no_grad()
    @_exact_arithmetic
    def nearest(self, x: torch.Tensor) -> torch.LongTensor:
        """The winning category of each row, whether or not it passes the vigilance (-1 for an empty memory)."""
        decided = self._decide(x)
        return decided.category if isinstance(decided, ARTOutput) else decided[0]

    def novelty(self, x: torch.Tensor) -> torch.Tensor:
        """1 - best similarity (`cosine`) or 1 - best match (`fuzzy`) of each row; 1 for an empty memory."""
        return self.classify(x).novelty

    def novelty_percentile(self, novelty: torch.Tensor) -> torch.Tensor:
        """
        Where each novelty value sits among those of every row the memory has learned from (`update`), as a
        percentile in [0, 100]: the share of training rows that were less novel (half of those in the same
        1/1000-wide bin). NaN while the memory has learned nothing.
        """
        histogram = self.novelty_histogram.double().cpu()
        total = histogram.sum()
        bins = _novelty_bins(torch.as_tensor(novelty, dtype=torch.float64).cpu())
        below = histogram.cumsum(0) - histogram  # rows in lower bins
        return 100 * (below[bins] + histogram[bins] / 2) / total if total else torch.full(bins.shape, math.nan)

    def novelty_quantile(self, q: float) -> float:
        """The novelty below which a share `q` of the training rows fall (the middle of a 1/1000-wide bin); NaN while
        the memory has learned nothing."""
        histogram = self.novelty_histogram.cpu()
        total = int(histogram.sum())
        if not total:
            return math.nan
        bin_index = int(torch.searchsorted(histogram.cumsum(0), math.ceil(q * total)))
        return (bin_index + 0.5) * NOVELTY_RANGE / NOVELTY_BINS

    # -----------------------------------------------------------------------------------------------------------------
    # Fitting the input transform, calibrating the verdict, describing categories

    @torch.no_grad()
    @_exact_arithmetic
    def fit_input_transform(self, x: torch.Tensor) -> "ARTMemory":
        """
        Fit the input transform's center (the mean row) and scale (the RMS distance of the rows to it) on in-domain
        rows `x` (N, dim), then `reset` the memory: categories learned in other coordinates mean nothing in the new
        ones. For `"standardize"` the rows are first divided by each dimension's standard deviation (floored at
        `DIM_SCALE_FLOOR` times their RMS), and the scale is the RMS distance of the divided rows to the center.
        Under `torch.distributed` every rank passes its rows and the sums are all-reduced in float64, so every rank
        gets the statistics of all the rows. Rows that are all the same (no spread) raise `ValueError`.
        """
        error = None
        try:
            x = self._check_x(x, transform=False)
        except Exception as exc:  # report after the collectives, or the other ranks would wait forever
            error, x = exc, torch.zeros(0, self.dim, dtype=torch.float64, device=self.weight.device)
        x = x.double()
        sums = self._all_reduced(torch.cat([x.sum(0), x.new_tensor([x.shape[0], error is not None])]))
        if error is not None:
            raise error
        if sums[-1]:
            raise ValueError("ARTMemory.fit_input_transform: invalid input on another rank; nothing was fitted")
        rows = int(sums[-2])
        if rows == 0:
            raise ValueError("ARTMemory.fit_input_transform needs at least one row")
        center = sums[:-2] / rows
        variance = self._all_reduced((x - center).square().sum(0)) / rows  # per dimension
        if not variance.sum() > 0:
            raise ValueError("ARTMemory.fit_input_transform: every row is the same, so there is no spread to scale by")
        dim_scale = torch.ones_like(variance)
        if self.input_transform == "standardize":
            dim_scale = variance.sqrt().clamp(min=DIM_SCALE_FLOOR * variance.mean().sqrt())
        # the RMS distance of the scaled rows to the center: mean_r |(x_r - c) / sigma|^2 = sum_d var_d / sigma_d^2
        scale = (variance / dim_scale.square()).sum().sqrt()
        self.reset()
        self.input_center.copy_(center)
        self.input_dim_scale.copy_(dim_scale)
        self.input_scale.fill_(scale)
        return self

    def _all_reduced(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of `values` over every rank (itself outside `torch.distributed`)."""
        if not _distributed():
            return values
        device = torch.device("cpu") if dist.get_backend() == "gloo" else self.weight.device
        values = values.to(device, torch.float64)
        dist.all_reduce(values)
        return values.to(self.weight.device)

    def _all_gathered(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's `values` (1-D, any length), concatenated in rank order (itself outside `torch.distributed`)."""
        if not _distributed():
            return values
        device = torch.device("cpu") if dist.get_backend() == "gloo" else self.weight.device
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([values.numel()], device=device))
        sizes = [int(size) for size in sizes]
        padded = torch.zeros(max(sizes), dtype=torch.float64, device=device)
        padded[: values.numel()] = values
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(values.device)

    @_exact_arithmetic
    def fit_outlier_exposure(self, inliers: torch.Tensor, outliers: torch.Tensor, l2: float = 1e-2) -> "ARTMemory":
        """
        Fit the outlier probe (outlier exposure, docs/design.md#outlier-exposure): a logistic regression telling
        in-domain rows `inliers` (N, dim; the rows the memory was fitted on) from rows of text that is not `outliers`
        (M, dim; other languages, random characters: never the kind of text you mean to detect, or the verdict's
        false-alarm rate on it says nothing), regularised by `l2` |w|^2. `outlier_score` then scores rows, and
        `calibrate(..., score="outliers")` adds it to the verdict. A calibration that used an earlier probe is
        forgotten. Under `torch.distributed` every rank passes its rows and the probe is fitted on all of them, the
        same on every rank.
        """
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not (0 < l2 < math.inf):
            raise ValueError(f"l2 must be a positive finite number, got {l2!r}")
        error, parts = None, []
        try:
            for rows in (inliers, outliers):
                parts.append(self._check_x(rows, transform=False).double())
        except Exception as exc:  # report after the collectives, or the other ranks would wait forever
            error, parts = exc, [torch.zeros(0, self.dim, dtype=torch.float64, device=self.weight.device)] * 2
        if self._all_reduced(parts[0].new_tensor([error is not None]))[0]:
            raise error or ValueError("ARTMemory.fit_outlier_exposure: invalid input on another rank; nothing fitted")
        inliers, outliers = (self._all_gathered(rows.flatten()).view(-1, self.dim) for rows in parts)
        if len(inliers) < 2 or len(outliers) < 1:
            raise ValueError(
                f"fit_outlier_exposure needs at least 2 inlier rows and 1 outlier row, got {len(inliers)} and "
                f"{len(outliers)}"
            )
        center, scale, weight, bias = fit_linear_probe(inliers, outliers, l2=float(l2))
        report = self.calibration_report()
        if report is not None and report["score"] == "outliers":
            self.calibration.zero_()
            self.calibration_quantiles.zero_()
        self.outlier_probe.copy_(torch.stack([center, scale, weight]))
        self.outlier_bias.fill_(float(bias))
        return self

    @property
    def outliers_fitted(self) -> bool:
        """Whether `fit_outlier_exposure` has fitted the outlier probe (a host sync)."""
        return bool(self.outlier_probe[1].any())

    @torch.no_grad()
    @_exact_arithmetic
    def outlier_score(self, x: torch.Tensor) -> torch.Tensor:
        """The outlier probe's score of each row of `x` (N, dim), float64: ((x - center) / scale) . weight + bias,
        higher for rows more like the outliers it was fitted on."""
        if not self.outliers_fitted:
            raise ValueError("no outlier probe: call fit_outlier_exposure(in_domain_rows, outlier_rows) first")
        center, scale, weight = self.outlier_probe.double()
        x = self._check_x(x, transform=False).double()
        return ((x - center) / scale) @ weight + self.outlier_bias.double()

    @torch.no_grad()
    @_exact_arithmetic
    def calibrate(
        self, x: torch.Tensor, fpr: float = 0.05, surprise: torch.Tensor | None = None, score: str | None = None
    ) -> dict:
        """
        Set the novelty threshold from held-out in-domain rows `x` (N, dim) so that a share `fpr` of them is flagged
        novel: "novel" then means "less familiar than a share 1 - fpr of in-domain inputs"
        (docs/design.md#calibrated-verdict). Nothing is learned.

        `surprise` (N,), *optional*: another per-row novelty signal (a model passes its mean per-token loss). `score`
        picks what `verdict` uses, one of `VERDICT_SCORES`:
        - `"novelty"`: the memory's novelty;
        - `"combined"`: `(novelty - m_n) / s_n + (surprise - m_s) / s_s`, the means and standard deviations over these
          rows (needs `surprise`);
        - `"outliers"`: `1.0 z_n + 0.5 z_s + 2.0 max(z_o, 0)` (`OUTLIER_SCORE_WEIGHTS`), z_o the z-score of
          `outlier_score(x)` (needs `surprise` and `fit_outlier_exposure`).
        Default: the last of these the arguments allow. Under `torch.distributed` every rank passes its rows and the
        threshold is that of all of them. Returns the calibration (`calibration_report`); saved with the memory.
        """
        if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
            raise ValueError(f"fpr must be a number in (0, 1), got {fpr!r}")
        if score is None:
            score = "novelty" if surprise is None else "outliers" if self.outliers_fitted else "combined"
        if score not in VERDICT_SCORES:
            raise ValueError(f"score must be one of {list(VERDICT_SCORES)}, got {score!r}")
        if score != "novelty" and surprise is None:
            raise ValueError(f"score={score!r} needs surprise (one value per row)")
        if score == "outliers" and not self.outliers_fitted:
            raise ValueError("score='outliers' needs the outlier probe: call fit_outlier_exposure first")
        novelty = self.classify(x).novelty.double()
        if surprise is not None:
            surprise = torch.as_tensor(surprise, dtype=torch.float64, device=novelty.device)
            if surprise.shape != novelty.shape or not torch.isfinite(surprise).all():
                raise ValueError(
                    f"surprise must be {tuple(novelty.shape)} finite values (one per row), got shape "
                    f"{tuple(surprise.shape)}"
                )
            surprise = self._all_gathered(surprise)
        outliers = self._all_gathered(self.outlier_score(x)) if score == "outliers" else None
        novelty = self._all_gathered(novelty)
        if novelty.numel() < 2:
            raise ValueError(f"calibrate needs at least 2 held-out rows, got {novelty.numel()}")
        if self.num_categories == 0:
            raise ValueError("calibrate needs a memory that has learned: every row is novel to an empty memory")
        levels = torch.linspace(0, 1, CALIBRATION_QUANTILES, dtype=torch.float64, device=novelty.device)
        values = dict.fromkeys(_CALIBRATION_FIELDS, 0.0)  # absent: see _CALIBRATION_FIELDS
        values |= {"fpr": fpr, "threshold": _upper_quantile(novelty, 1 - fpr), "rows": novelty.numel()}
        values |= {"novelty_mean": novelty.mean(), "novelty_std": novelty.std().clamp_min(1e-12)}
        values["score"] = VERDICT_SCORES.index(score)
        if surprise is not None:
            values |= {"surprise_mean": surprise.mean(), "surprise_std": surprise.std().clamp_min(1e-12)}
        if outliers is not None:
            values |= {"outliers_mean": outliers.mean(), "outliers_std": outliers.std().clamp_min(1e-12)}
        combined_quantiles = torch.zeros_like(levels)
        if surprise is not None:  # with score="novelty" too: the report keeps the combined score's threshold
            combined = _combined_score(
                "combined" if score == "novelty" else score, values, novelty, surprise, outliers
            )
            values["combined_threshold"] = _upper_quantile(combined, 1 - fpr)
            combined_quantiles = torch.quantile(combined, levels)
        self.calibration.copy_(
            torch.tensor([float(values[name]) for name in _CALIBRATION_FIELDS], dtype=torch.float64)
        )
        self.calibration_quantiles.copy_(torch.stack([torch.quantile(novelty, levels), combined_quantiles]))
        return self.calibration_report()

    def calibration_report(self) -> dict | None:
        """The calibration as a dict (`fpr`, `threshold`, `score`, the rows it used, ...), None before `calibrate`."""
        if not self.calibrated:
            return None
        values = dict(zip(_CALIBRATION_FIELDS, self.calibration.tolist(), strict=True))
        values["rows"] = int(values["rows"])
        values["score"] = VERDICT_SCORES[int(values["score"])]
        if not values["surprise_std"]:  # calibrated without surprise
            for name in ("combined_threshold", "surprise_mean", "surprise_std"):
                values[name] = None
        if not values["outliers_std"]:  # calibrated without the outlier probe
            values["outliers_mean"] = values["outliers_std"] = None
        return values

    @torch.no_grad()
    def verdict(
        self, novelty: torch.Tensor, surprise: torch.Tensor | None = None, outliers: torch.Tensor | None = None
    ) -> dict:
        """
        The calibrated verdict on rows whose `novelty` (from `classify` or `novelty`) and, as the calibrated score
        needs, `surprise` and `outliers` (from `outlier_score`) are given: `score` (the calibrated score),
        `percentile` (the share of the calibration rows with a lower score, in [0, 100]) and `novel` (score above the
        threshold), as tensors. Raises `ValueError` before `calibrate`.
        """
        report = self.calibration_report()
        if report is None:
            raise ValueError("the memory is not calibrated: call calibrate(held_out_in_domain_rows) first")
        novelty = torch.as_tensor(novelty, dtype=torch.float64).cpu()
        quantiles = self.calibration_quantiles.double().cpu()
        if report["score"] == "novelty":
            score, threshold, quantiles = novelty, report["threshold"], quantiles[0]
        else:
            if surprise is None or (report["score"] == "outliers" and outliers is None):
                needs = "surprise" if report["score"] == "combined" else "surprise and outliers (outlier_score(rows))"
                raise ValueError(f"this memory's verdict uses the {report['score']!r} score: pass {needs} too")
            surprise = torch.as_tensor(surprise, dtype=torch.float64).cpu()
            outliers = None if outliers is None else torch.as_tensor(outliers, dtype=torch.float64).cpu()
            score = _combined_score(report["score"], report, novelty, surprise, outliers)
            threshold, quantiles = report["combined_threshold"], quantiles[1]
        return {"score": score, "percentile": _percentile_of(score, quantiles), "novel": score > threshold}

    def describe_category(self, category: int) -> dict:
        """What the memory keeps about a category: its `count`, `created_at` (how many rows the memory had learned
        from before the row that created it; -1 if unknown, as in files saved before it was kept) and `exemplar`
        (the tokens passed with that row, -1 padding dropped; empty if none were)."""
        if not 0 <= category < self.num_categories:
            raise ValueError(f"category must be in [0, {self.num_categories}), got {category!r}")
        exemplar = self.category_exemplars[category]
        return {
            "category": category,
            "count": int(self.category_counts[category]),
            "created_at": int(self.category_created[category]),
            "exemplar": exemplar[exemplar >= 0].tolist(),
        }

    # -----------------------------------------------------------------------------------------------------------------
    # Persistence

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool | None = None,
        weights_sha256: dict[str, str] | None = None,
    ) -> str | None:
        """
        Write `art_memory.safetensors` into `save_directory` (atomically: a reader sees the old file or the new one).

        Only the main process writes: `is_main_process=None` means rank 0 under `torch.distributed`, else True.
        `weights_sha256` (file name -> sha256) records the model weights saved with the memory, which `load_file`
        can then check. Returns the file's path, or None where nothing was written.
        """
        if is_main_process is None:
            is_main_process = not _distributed() or dist.get_rank() == 0
        if not is_main_process:
            return None
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, ART_MEMORY_FILE)
        _atomic_write(path, self._to_bytes(weights_sha256))
        return path

    def _to_bytes(self, weights_sha256: dict[str, str] | None = None) -> bytes:
        k = self.num_categories
        tensors = {
            "prototypes": self.weight[:k].detach().cpu().contiguous(),
            "counts": self.category_counts[:k].detach().cpu().contiguous(),
            "novelty_histogram": self.novelty_histogram.detach().cpu().contiguous(),
            "input_center": self.input_center.detach().cpu().contiguous(),
            "input_scale": self.input_scale.detach().cpu().reshape(1),
            "input_dim_scale": self.input_dim_scale.detach().cpu().contiguous(),
            "calibration": self.calibration.detach().cpu().contiguous(),
            "calibration_quantiles": self.calibration_quantiles.detach().cpu().contiguous(),
            "outlier_probe": self.outlier_probe.detach().cpu().contiguous(),
            "outlier_bias": self.outlier_bias.detach().cpu().reshape(1),
            "rows_seen": self.rows_seen.detach().cpu().reshape(1),
            "category_created": self.category_created[:k].detach().cpu().contiguous(),
            "category_exemplars": self.category_exemplars[:k].detach().cpu().contiguous(),
        }
        config = {
            "rule": self.rule,
            "dim": self.dim,
            "vigilance": self.vigilance,
            "beta": self.beta,
            "alpha": self.alpha,
            "max_categories": self.max_categories,
            "num_categories": k,
            "input_transform": self.input_transform,
            "lift": self.lift,
        }
        return encode_art_file(config, tensors, weights_sha256)

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
        max_buffer_bytes: int = ART_MAX_BUFFER_BYTES,
    ) -> "ARTMemory":
        """
        Load a memory saved with `save_pretrained`, bit-exactly: from a folder, an `art_memory.safetensors` file or a
        Hub repo id (through the HuggingFace cache; the hub arguments are `transformers.utils.cached_file`'s).

        The stored prototype dtype is kept unless `dtype` is given. Damaged, truncated or inconsistent files raise
        `ValueError` naming the file and the problem, and so does a file whose `max_categories` and `dim` would make
        the memory's buffers larger than `max_buffer_bytes` (default `ART_MAX_BUFFER_BYTES`, 1 GiB; raise it to load
        a larger memory), before anything is allocated.
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
        return cls.from_file(path, device=device, dtype=dtype, max_buffer_bytes=max_buffer_bytes)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_buffer_bytes: int = ART_MAX_BUFFER_BYTES,
    ) -> "ARTMemory":
        """A new memory with the hyperparameters and state stored in an `art_memory.safetensors` file (see
        `from_pretrained` for `max_buffer_bytes`)."""
        config, tensors = load_art_file(path)
        dtype = dtype or tensors["prototypes"].dtype
        _check_exact_cast(path, tensors["prototypes"], dtype)
        stored_dim = ART_RULES[config["rule"]]().stored_dim(art_rule_dim(config["dim"], config["input_transform"]))
        needed = art_buffer_bytes(config["max_categories"], stored_dim, dtype.itemsize)
        if needed > max_buffer_bytes:
            raise ValueError(
                f"{os.fspath(path)}: max_categories={config['max_categories']} and dim={config['dim']} need "
                f"{needed:,} bytes of buffers, above max_buffer_bytes={max_buffer_bytes:,}; pass a larger "
                "max_buffer_bytes to load this memory"
            )
        memory = cls(
            config["dim"],
            rule=config["rule"],
            vigilance=config["vigilance"],
            beta=config["beta"],
            alpha=config["alpha"],
            max_categories=config["max_categories"],
            input_transform=config["input_transform"],
            lift=config["lift"],
            device=device,
            dtype=dtype,
        )
        memory._set_state(tensors)
        return memory

    @_serialised
    def load_file(
        self, path: str | os.PathLike, locate_weights=None, weights_variant: str | None = None
    ) -> "ARTMemory":
        """
        Replace this memory's state with the one stored in `path`.

        The file must be intact and match this memory's rule, dim, vigilance, beta and alpha, and its categories must
        fit in `max_categories` (which may differ); otherwise `ValueError` and the memory is unchanged. With
        `locate_weights` (a weights file name -> its path, or None), the weights files the ART file was saved with
        must be there unchanged and include every weights file the load reads (see `save_pretrained`'s
        `weights_sha256`); an ART file that names no weights then loads with an `UnpairedARTFileWarning`.
        """
        config, tensors = load_art_file(path)
        if locate_weights is not None:
            paired = check_weights_sha256(os.fspath(path), config["weights_sha256"], locate_weights, weights_variant)
            if not paired:
                warnings.warn(
                    f"{os.fspath(path)} names no weights (ARTMemory.save_pretrained wrote it on its own, not "
                    "model.save_pretrained), so nothing shows it belongs to the weights beside it; save the model "
                    "with model.save_pretrained to pair the two",
                    UnpairedARTFileWarning,
                    stacklevel=2,
                )
        mismatched = [
            f"{key} is {config[key]!r} in the file but {mine!r} here"
            for key, mine in (
                ("rule", self.rule),
                ("dim", self.dim),
                ("vigilance", self.vigilance),
                ("beta", self.beta),
                ("alpha", self.alpha),
                ("input_transform", self.input_transform),
                ("lift", self.lift),
            )
            if config[key] != mine
        ]
        if config["num_categories"] > self.max_categories:
            mismatched.append(
                f"{config['num_categories']} categories do not fit in max_categories={self.max_categories}"
            )
        if mismatched:
            raise ValueError(f"{os.fspath(path)} does not fit this memory: " + "; ".join(mismatched))
        _check_exact_cast(path, tensors["prototypes"], self.weight.dtype)
        self._set_state(tensors)
        return self

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take a file's state; a version 2 file has no transform, calibration or category descriptions, a version 3
        file no per-dimension scale (ones: it predates "standardize"), and a version 3 or 4 file no outlier probe."""
        k = tensors["prototypes"].shape[0]
        self.reset()
        self.weight[:k] = tensors["prototypes"]
        self.category_counts[:k] = tensors["counts"]
        self.num_committed.fill_(k)
        self.novelty_histogram.copy_(tensors["novelty_histogram"])
        self.input_center.zero_()
        self.input_scale.zero_()
        self.input_dim_scale.copy_(tensors.get("input_dim_scale", torch.ones(self.dim)))
        self.outlier_probe.copy_(tensors.get("outlier_probe", torch.zeros(3, self.dim)))
        self.outlier_bias.copy_(tensors.get("outlier_bias", torch.zeros(1))[0])
        if "input_center" in tensors:
            self.input_center.copy_(tensors["input_center"])
            self.input_scale.copy_(tensors["input_scale"][0])
            calibration = tensors["calibration"]  # before format 5: without the outlier probe's two fields
            self.calibration.copy_(
                torch.cat([calibration, calibration.new_zeros(len(_CALIBRATION_FIELDS) - len(calibration))])
            )
            self.calibration_quantiles.copy_(tensors["calibration_quantiles"])
            self.rows_seen.copy_(tensors["rows_seen"][0])
            self.category_created[:k] = tensors["category_created"]
            self.category_exemplars[:k] = tensors["category_exemplars"]
        else:
            self.rows_seen.fill_(int(tensors["counts"].sum()))


def _combined_score(score: str, stats: dict, novelty, surprise, outliers) -> torch.Tensor:
    """The `"combined"` or `"outliers"` score of rows, from the calibration's means and standard deviations."""
    z = {name: (values - stats[f"{name}_mean"]) / stats[f"{name}_std"] for name, values in
         (("novelty", novelty), ("surprise", surprise), ("outliers", outliers)) if values is not None}  # fmt: skip
    if score == "combined":
        return z["novelty"] + z["surprise"]
    weights = OUTLIER_SCORE_WEIGHTS
    return (
        weights["novelty"] * z["novelty"]
        + weights["surprise"] * z["surprise"]
        + weights["outliers"] * z["outliers"].clamp(min=0)
    )


def _upper_quantile(values: torch.Tensor, q: float) -> float:
    """The smallest value with at least a share `q` of `values` at or below it: at most 1 - q of them lie above."""
    ordered = values.sort().values
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


def _percentile_of(score: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Where each score sits among the calibration rows, in [0, 100], by linear interpolation between the quantiles
    at 0, 1, ..., 100 percent; a plateau of equal quantiles (ties) counts from its middle."""
    levels = torch.linspace(0, 100, len(quantiles), dtype=torch.float64)
    low = torch.searchsorted(quantiles, score, side="left")
    high = torch.searchsorted(quantiles, score, side="right")
    inside = (low > 0) & (high < len(quantiles))
    lo, hi = (low - 1).clamp(0, len(quantiles) - 1), high.clamp(0, len(quantiles) - 1)
    span = (quantiles[hi] - quantiles[lo]).clamp_min(1e-300)
    interpolated = levels[lo] + (levels[hi] - levels[lo]) * ((score - quantiles[lo]) / span).clamp(0, 1)
    outside = torch.where(low == 0, 0.0, 100.0)
    return torch.where(inside, interpolated, outside).to(torch.float64)


def _check_exact_cast(path, prototypes: torch.Tensor, dtype: torch.dtype) -> None:
    """Loading is bit-exact: refuse stored prototypes that the memory's dtype would turn into inf or round."""
    if prototypes.dtype == dtype:
        return
    cast = prototypes.to(dtype)
    overflow = int((~torch.isfinite(cast)).sum())
    rounded = int((cast.to(prototypes.dtype) != prototypes).sum()) - overflow
    if overflow or rounded:
        problems = [
            f"{n} value{'s' if n > 1 else ''} {verb}"
            for n, verb in ((overflow, "overflows"), (rounded, "would be rounded"))
            if n
        ]
        raise ValueError(
            f"{os.fspath(path)}: its {prototypes.dtype} prototypes do not fit {dtype} exactly "
            f"({', '.join(problems)}); load them into a memory of their own dtype (dtype={prototypes.dtype})"
        )


def _novelty_bins(novelty: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each novelty value (novelty lies in [0, 2] for `cosine`, [0, 1] for `fuzzy`)."""
    return (novelty * (NOVELTY_BINS / NOVELTY_RANGE)).floor().long().clamp(0, NOVELTY_BINS - 1)


__all__ = [
    "ART_EXEMPLAR_TOKENS",
    "ART_FORMAT",
    "ART_ENGINES",
    "ART_INPUT_TRANSFORMS",
    "ART_FORMAT_VERSION",
    "ART_MAX_BUFFER_BYTES",
    "ART_MEMORY_FILE",
    "ART_RULES",
    "ARTMemory",
    "DIM_SCALE_FLOOR",
    "ARTOutput",
    "ARTRule",
    "ARTStatus",
    "UnpairedARTFileWarning",
    "CosineRule",
    "FuzzyRule",
    "load_art_file",
    "to_unit_interval",
]
