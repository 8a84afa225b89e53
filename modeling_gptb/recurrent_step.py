"""The GPTB step: the window a step reads, its attention mask, and the loop over the steps of a call.

`RecurrentSteps` is mixed into `GPTBModel` (which holds `wte`, `wpe`, `drop`, the blocks `h`, `ln_f`, `state_update`
and `window_positions`); `modeling_gptb.py` keeps the transformers plumbing (inputs, outputs, caches, loading). The
step is defined in `docs/design.md#the-step`.

This file travels to the Hub as remote code: it imports only torch.
"""

import torch


def _join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The spans' outputs as one tensor; a single span (no checkpointing) is returned without a copy."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class RecurrentSteps:
    """The steps of a call over the window `[state; token]` (M + 1 positions), for `GPTBModel`."""

    def compile_step(self, **compile_kwargs):
        """
        Compile one step's window (blocks and `ln_f`) with `torch.compile(**compile_kwargs)`; every step reuses it.

        Optional and off by default: on a CPU it measured no gain (eager 190 ms, compiled 187 ms for the quick
        benchmark's 8 steps) for 17 s of compiling. Meant for GPUs, where small batches are bound by kernel launches.
        With `mode="reduce-overhead"` (CUDA graphs) a replay overwrites the previous step's outputs, which `forward`
        still holds: not supported yet.
        """
        self._window = torch.compile(self._window, **compile_kwargs)
        return self

    def _window(self, window: torch.Tensor, all_layers: bool, attentions: bool = False):
        """
        Blocks and `ln_f` over one window. With `all_layers`, also every layer's output at the token position
        `(n_layer + 1, batch, n_embd)`; with `attentions`, every block's weights `(n_layer, batch, n_head, M+1, M+1)`.
        """
        x = self.drop(window)
        per_layer = [x[:, -1]] if all_layers else None
        weights = [] if attentions else None
        for block in self.h:
            x, block_weights = block(x, attentions)
            if all_layers:
                per_layer.append(x[:, -1])
            if attentions:
                weights.append(block_weights)
        x = self.ln_f(x)
        if all_layers:
            per_layer[-1] = x[:, -1]
            per_layer = torch.stack(per_layer, dim=0)
        return x, per_layer, torch.stack(weights, dim=0) if attentions else None

    def _run_call(self, state, token_embeds, step_mask, output_hidden_states, output_attentions):
        """
        Every step of a call from `state` over `token_embeds` `(B, T, D)`. Returns the final state, the last layer's
        outputs at the token positions `(B, T, D)`, and the per-layer outputs / attention weights (tuples, or None
        when not asked for).
        """
        steps = token_embeds.shape[1]
        positions = self.wpe(self.window_positions)
        # With activation checkpointing only the state every `span` steps is kept; each span is recomputed whole in
        # the backward pass. Without it, one span runs the whole call.
        checkpointed = self.gradient_checkpointing and self.training
        span = (self.config.checkpoint_every_steps or 1) if checkpointed else steps
        token_outputs, layer_outputs, attention_outputs = [], [], []
        for start in range(0, steps, span):
            args = (state, token_embeds[:, start : start + span], positions, step_mask, start)
            args += (output_hidden_states, output_attentions)
            if checkpointed:
                state, tokens, per_layer, weights = self._gradient_checkpointing_func(self._run_steps, *args)
            else:
                state, tokens, per_layer, weights = self._run_steps(*args)
            token_outputs.append(tokens)
            layer_outputs.append(per_layer)
            attention_outputs.append(weights)

        last_hidden_state = _join(token_outputs, dim=1)
        hidden_states = attentions = None
        if output_hidden_states:
            hidden_states = tuple(_join(layer_outputs, dim=2).unbind(0))
        if output_attentions:
            attentions = tuple(_join(attention_outputs, dim=3).unbind(0))  # per layer: (B, H, T, M+1, M+1)
        return state, last_hidden_state, hidden_states, attentions

    def _run_steps(self, state, token_embeds, positions, step_mask, start, all_layers, attentions):
        """
        The steps `start .. start + k - 1` of a call, for the `k` tokens of `token_embeds` `(B, k, D)`, from `state`.
        Returns the state after them, the last layer's outputs at the token positions `(B, k, D)`, and with
        `all_layers` / `attentions` the per-step outputs of `_window` stacked along dimension 2 / 3. One function so
        activation checkpointing can recompute `k` steps at a time (`config.checkpoint_every_steps`).
        """
        bptt = self.config.bptt_steps
        token_outputs, layer_outputs, attention_outputs = [], [], []
        for i in range(token_embeds.shape[1]):
            t = start + i
            if bptt is not None and t > 0 and t % bptt == 0:
                state = state.detach()
            state_read = state if self.state_update is None else self.state_update.read(state)
            window = torch.cat([state_read, token_embeds[:, i : i + 1]], dim=1) + positions
            out, per_layer, weights = self._window(window, all_layers, attentions)
            new_state = out[:, : self.state_size]
            if self.state_update is not None:
                new_state = self.state_update(state, new_state, out[:, -1], token_embeds[:, i])
            if step_mask is not None:
                new_state = torch.where(step_mask[:, t, None, None], new_state, state)
            state = new_state
            token_outputs.append(out[:, -1])
            if all_layers:
                layer_outputs.append(per_layer)
            if attentions:
                attention_outputs.append(weights)
        return (
            state,
            torch.stack(token_outputs, dim=1),
            torch.stack(layer_outputs, dim=2) if all_layers else None,
            torch.stack(attention_outputs, dim=3) if attentions else None,
        )
