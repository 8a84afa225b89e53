"""How a GPTB step turns its window's output into the next state (`GPTBConfig.state_update`).

With S the state (M x D), x the token's embedding and U = ln_f(blocks([read(S); x] + wpe))[:M] the window's output at
the state slots:

- `"replace"` (the seed's step, docs/design.md#the-step): read(S) = S and S' = U.
- `"gated"`: a selective retain gate (GRU/Mamba-style, computed per slot and channel from U) and a learned scale on
  the state as it enters the window, so the token's write is not drowned by a state of norm sqrt(D):

      read(S) = s * S
      r       = a * sigmoid(U W + b)
      S'      = r * S + (1 - r) * U

  with s, a, b in R^D and W in R^(D x D). Initialised as s = `state_read_scale_init`, W = 0, b = `state_gate_bias`,
  a = `state_retain_init`: at the defaults (s = 1, a = 0) the step is exactly the seed's (a GPT-2 warm start runs
  unchanged) and training opens the gate; a = 1 starts as a retain gate of sigmoid(`state_gate_bias`), and a small s
  lets the token's write count against a state of norm sqrt(D) (token embeddings start near norm 0.02 sqrt(D)).
- `"residual"`: a learned read scale, a retain amplitude and an additive write from the window's output at the token
  position h = ln_f(blocks(...))[M], one write per slot:

      read(S) = s * S
      S'      = a * S + (1 - a) * U + reshape(h W_w + b_w, (M, D))

  with s, a in R^D, W_w in R^(D x MD), b_w in R^(MD); s = `state_read_scale_init`, a = `state_retain_init`,
  W_w = 0, b_w = 0. At the defaults (s = 1, a = 0) the step is exactly the seed's; a = 1 makes the state a residual
  stream across steps (S' = S + write, never renormalised by ln_f).
- `"selective"`: the `"residual"` write let in per slot by a gate that reads the input token x (its embedding
  wte(token) [+ wte(token_type)], before positions), Mamba-style selectivity: a distractor can learn to write
  nothing, so that a key can be held over long distances:

      read(S) = s * S
      z       = sigmoid(x W_g + b_g)                        (one gate per slot, in (0, 1)^M)
      S'      = a * S + (1 - a) * U + z[:, None] * reshape(h W_w + b_w, (M, D))

  with s, a, W_w, b_w as in `"residual"`, W_g in R^(D x M), b_g in R^M; W_g = 0, b_g = `state_gate_bias`, the rest
  initialised as in `"residual"`: at the defaults (s = 1, a = 0, write 0) the step is exactly the seed's.
- `"addressed"`: the `"selective"` step with the gate reading the token position's output h instead of the input
  token: h has read the state and the token, so a step can choose the slot it writes from what came before (the
  value after a key can go to the slot that key picked):

      z       = sigmoid(h W_g + b_g)
      S'      = a * S + (1 - a) * U + z[:, None] * reshape(h W_w + b_w, (M, D))

  with every parameter and its initialisation as in `"selective"`.

This file travels to the Hub as remote code: it imports only torch.
"""

import math

import torch
from torch import nn


def check_state_update_fields(config) -> None:
    """Raise a `ValueError` naming a state-update field of `config` outside its allowed values."""
    if config.state_update not in STATE_UPDATES:
        raise ValueError(f"GPTBConfig.state_update must be one of {STATE_UPDATES}, got {config.state_update!r}")
    for name in ("state_gate_bias", "state_retain_init", "state_read_scale_init"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"GPTBConfig.{name} must be a finite number, got {value!r}")


class StateUpdate(nn.Module):
    """What every variant has: the read scale s and the retain amplitude a, both `(D,)`."""

    def __init__(self, config):
        super().__init__()
        self.read_scale = nn.Parameter(torch.ones(config.n_embd))
        self.retain = nn.Parameter(torch.zeros(config.n_embd))

    def read(self, state: torch.Tensor) -> torch.Tensor:
        """The state as the window sees it."""
        return state * self.read_scale


class GatedStateUpdate(StateUpdate):
    """`state_update="gated"`: the state's read scale and its retain gate (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, state, slots, token, token_in) -> torch.Tensor:
        """The next state from the current one and the window's output at the state slots (`token*` unused)."""
        retain = self.retain * torch.sigmoid(self.gate(slots))
        return slots + retain * (state - slots)


class ResidualStateUpdate(StateUpdate):
    """`state_update="residual"`: read scale, retain amplitude, a write from the token position (module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.write = nn.Linear(config.n_embd, config.state_size * config.n_embd)

    def written(self, token: torch.Tensor, token_in: torch.Tensor) -> torch.Tensor:
        """What the step adds to the state, `(B, M, D)`, from the token position's output `token` `(B, D)`."""
        return self.write(token).unflatten(-1, (-1, token.shape[-1]))

    def forward(self, state, slots, token, token_in) -> torch.Tensor:
        """The next state from the current one, the window's output at the state slots and at the token `(B, D)`."""
        return slots + self.retain * (state - slots) + self.written(token, token_in)


class SelectiveStateUpdate(ResidualStateUpdate):
    """`state_update="selective"`: the residual write, let in per slot by a gate that reads the input token."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.state_size)

    def gate_input(self, token: torch.Tensor, token_in: torch.Tensor) -> torch.Tensor:
        """What the write gate reads: the token's input embedding."""
        return token_in

    def written(self, token: torch.Tensor, token_in: torch.Tensor) -> torch.Tensor:
        """The residual write, scaled per slot by sigmoid(g W_g + b_g) of the gate's input g."""
        return torch.sigmoid(self.gate(self.gate_input(token, token_in)))[..., None] * super().written(token, token_in)


class AddressedStateUpdate(SelectiveStateUpdate):
    """`state_update="addressed"`: the selective write with its gate reading the token position's output."""

    def gate_input(self, token: torch.Tensor, token_in: torch.Tensor) -> torch.Tensor:
        return token


# The module of each variant; `"replace"` (the seed's step) has no parameters and no module.
STATE_UPDATE_MODULES = {
    "gated": GatedStateUpdate,
    "residual": ResidualStateUpdate,
    "selective": SelectiveStateUpdate,
    "addressed": AddressedStateUpdate,
}
STATE_UPDATES = ("replace", *STATE_UPDATE_MODULES)


def build_state_update(config) -> StateUpdate | None:
    """The module of `config.state_update`; None for `"replace"`, which has no parameters."""
    module = STATE_UPDATE_MODULES.get(config.state_update)
    return module(config) if module is not None else None
