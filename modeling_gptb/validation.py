"""Input checks for GPTB's forward: each bad value becomes a `ValueError` naming it and what is expected, raised
before any work (no step run, no memory changed).

Checks of shapes and types cost nothing. Checks of values (token ids in range, 0/1 masks, finite states) read the
tensors, so they are collected in a [`ValueChecks`] and settled with one host sync. Under `torch.compile` (and while a
CUDA graph is captured) they become `torch._assert_async` in the graph instead (a `RuntimeError` with the same
message, and no graph break or host sync).

This file travels to the Hub as remote code with `modeling_gptb.py`: it imports only torch and the standard library.
"""

from collections.abc import Callable

import torch

# integer dtypes `nn.Embedding` indexes with
INDEX_DTYPES = (torch.long, torch.int)

# forward/generate arguments of GPT2LMHeadModel that have no meaning for a recurrent model: refused, never ignored
UNSUPPORTED_GPT2_ARGUMENTS = {
    "position_ids": "GPTB has no token positions (every step's window uses positions 0..state_size)",
    "encoder_hidden_states": "GPTB has no cross-attention",
    "encoder_attention_mask": "GPTB has no cross-attention",
}
# transformers' keyword arguments (TransformersKwargs) that GPTB reads; the others are refused when set
LOSS_KWARGS = ("num_items_in_batch",)


class ValueChecks:
    """Conditions on tensor values, settled together: `add` each one, then `raise_first_failure()` once."""

    def __init__(self):
        self._checks: list[tuple[torch.Tensor, str, Callable[[], str] | None]] = []

    def add(self, ok: torch.Tensor, message: str, detail: Callable[[], str] | None = None):
        """`ok`: a 0-d bool tensor; `message`: the error; `detail()`: a fuller one that may read tensor values."""
        self._checks.append((ok, message, detail))

    def raise_first_failure(self):
        if not self._checks:
            return
        if torch.compiler.is_compiling() or _capturing_cuda_graph():
            for ok, message, _ in self._checks:
                torch._assert_async(ok, message)
            return
        device = self._checks[0][0].device
        if bool(torch.stack([ok.to(device) for ok, _, _ in self._checks]).all()):  # the one host sync
            return
        for ok, message, detail in self._checks:
            if not bool(ok):
                raise ValueError(detail() if detail is not None else message)


def _capturing_cuda_graph() -> bool:
    """Inside `torch.cuda.graph` capture (CUDA-graph decoding) a host sync is an error: assert on the device."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_token_ids(checks: ValueChecks, name: str, ids: torch.Tensor, vocab_size: int, ignore_index=None):
    """`ids` (any shape) must be integer ids in [0, vocab_size), or `ignore_index`."""
    if ids.dtype not in INDEX_DTYPES:
        raise ValueError(f"`{name}` must be a torch.long (or torch.int) tensor of token ids, got dtype {ids.dtype}")
    valid = (ids >= 0) & (ids < vocab_size)
    allowed = f"[0, {vocab_size})"
    if ignore_index is not None:
        valid |= ids == ignore_index
        allowed += f" or {ignore_index} (ignored)"

    def detail():
        bad = ids[~valid][0].item()
        if name == "input_ids":
            return f"token id {bad} is outside the vocabulary: ids must be in {allowed}"
        return f"`{name}` value {bad} is outside the vocabulary: {name} must be in {allowed}"

    checks.add(valid.all(), f"`{name}` holds values outside {allowed}", detail)


def check_binary_mask(checks: ValueChecks, name: str, mask: torch.Tensor):
    """`mask` must hold only 0 and 1 (a bool tensor always does)."""
    if mask.dtype == torch.bool:
        return
    if mask.is_complex():
        raise ValueError(f"`{name}` must hold 0 and 1, got dtype {mask.dtype}")
    binary = (mask == 0) | (mask == 1)

    def detail():
        return f"`{name}` must hold only 0 (skip) and 1 (read), got {mask[~binary][0].item()!r}"

    checks.add(binary.all(), f"`{name}` must hold only 0 and 1", detail)


def check_finite(checks: ValueChecks, name: str, values: torch.Tensor):
    # one cheap reduction: a NaN or Inf anywhere makes the sum non-finite (and so would an overflowing sum of finite
    # values, which a state of LayerNorm outputs never reaches)
    checks.add(torch.isfinite(values.sum()), f"`{name}` holds NaN or Inf: pass finite values")


def check_logits_to_keep(logits_to_keep, steps: int, has_labels: bool):
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(
            f"`logits_to_keep` must be an int >= 0 (the last N steps; 0 keeps all), got {logits_to_keep!r}"
        )
    if has_labels and 0 < logits_to_keep < steps:
        raise ValueError(
            f"`labels` need the logits of every step: leave `logits_to_keep` at 0 (got {logits_to_keep} of "
            f"{steps} steps)"
        )


def check_extra_kwargs(kwargs: dict, owner: str):
    """Refuse GPT-2 arguments GPTB cannot honour, and any other keyword it does not read, when set (not None/False)."""
    given = {name for name, value in kwargs.items() if value is not None and value is not False}
    for name, reason in UNSUPPORTED_GPT2_ARGUMENTS.items():
        if name in given:
            raise ValueError(f"{owner} does not take `{name}`: {reason}; leave it None")
    unknown = sorted(given - set(LOSS_KWARGS))
    if unknown:
        raise ValueError(f"{owner} got unexpected argument(s) {', '.join(map(repr, unknown))}")
