"""The GPTB step: the window a step reads, its attention mask, and the loop over the steps of a call.

Two layouts, chosen by `config.segment_length` (K):

- K = 1, the one-token step (docs/design.md#the-step): the window `[state; token]`, M + 1 positions, bidirectional
  (causal with `rebias=False`); the next state is the window's output at the state slots.
- K > 1, the segment step (docs/design.md#segment-steps, RMT's layout): the window `[read slots; K tokens; write
  slots]`, 2M + K positions, both slot groups made from the state; read slots attend among themselves, token i to
  the read slots and tokens <= i, write slots to everything (`rebias=False`: causal over the window); the next state
  is the window's output at the write slots. A call's last segment may be partial: its tokens get logits, and it is
  written into the returned state, while the cache keeps its tokens so a later call completes it.

`RecurrentSteps` is mixed into `GPTBModel` (which holds `wte`, `wpe`, `drop`, the blocks `h`, `ln_f`, `state_update`
and `window_positions`); `modeling_gptb.py` keeps the transformers plumbing (inputs, outputs, caches, loading).

This file travels to the Hub as remote code: it imports only the standard library and torch.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


def _join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The spans' outputs as one tensor; a single span (no checkpointing) is returned without a copy."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class CallOutput(NamedTuple):
    """What the steps of one call leave."""

    state: torch.Tensor  # after every token of the call, a last partial segment written: `past_hidden_states`
    cache_state: torch.Tensor  # after the complete segments only: what a `GPTBCache` continues from
    pending: torch.Tensor | None  # (B, P, D) the last partial segment's token embeddings, which the cache carries
    pending_mask: torch.Tensor | None  # (B, P) bool, which of them are tokens (None: all)
    last_hidden_state: torch.Tensor  # (B, T, D)
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None
    # per block, the keys and values (B, H, M + P, head_dim) of the read slots and the pending tokens (decode steps)
    keys_values: list | None = None
    # with `keep_written` (segment steps): the state each segment wrote (B, S, M, D), and the call positions of its
    # tokens (B, S, K), -1 where the segment holds no token of this call (padding, a masked step, a cached token)
    written: torch.Tensor | None = None
    written_positions: torch.Tensor | None = None


def segment_mask(state_size: int, segment_length: int, rebias: bool, device=None) -> torch.Tensor:
    """
    The `(2M + K, 2M + K)` boolean mask of a segment window (True: the query, a row, may read the key, a column):
    read slots read the read slots; token i reads the read slots and tokens <= i; write slots read everything.
    `rebias=False`: GPT-2's causal order over the whole window.
    """
    M, K = state_size, segment_length
    width = 2 * M + K
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    if not rebias:
        return causal
    allowed = torch.zeros(width, width, dtype=torch.bool, device=device)
    allowed[:M, :M] = True
    allowed[M : M + K, :M] = True
    allowed[M : M + K, M : M + K] = causal[:K, :K]
    allowed[M + K :] = True
    return allowed


class RecurrentSteps:
    """The steps of a call (one-token steps or segment steps), for `GPTBModel`."""

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

    def _window(self, window: torch.Tensor, all_layers: bool, attentions: bool = False, mask=None, tokens=-1):
        """
        Blocks and `ln_f` over one window, under `mask` (None: the one-token step's rule). With `all_layers`, also
        every layer's output at the token position(s) `tokens` (an index or a slice of the window), stacked on a new
        first dimension of size `n_layer + 1`; with `attentions`, every block's weights `(n_layer, batch, n_head,
        width, width)`.
        """
        x = self.drop(window)
        per_layer = [x[:, tokens]] if all_layers else None
        weights = [] if attentions else None
        for block in self.h:
            x, block_weights = block(x, attentions, mask)
            if all_layers:
                per_layer.append(x[:, tokens])
            if attentions:
                weights.append(block_weights)
        x = self.ln_f(x)
        if all_layers:
            per_layer[-1] = x[:, tokens]
            per_layer = torch.stack(per_layer, dim=0)
        return x, per_layer, torch.stack(weights, dim=0) if attentions else None

    def _run_call(
        self,
        state,
        token_embeds,
        step_mask,
        output_hidden_states,
        output_attentions,
        cache=None,
        write_partial_segment=True,
        keep_written=False,
    ) -> CallOutput:
        """
        Every step of a call from `state` over `token_embeds` `(B, T, D)`, where `step_mask` `(B, T)` (None: all)
        marks the tokens that count; with segment steps, after the partial segment `cache` (a `GPTBCache` or None)
        holds. `write_partial_segment=False`: the returned `state` is the state after the complete segments.
        `keep_written` (segment steps): also return each segment's written state (the write target's input).
        """
        if self.config.segment_length == 1:
            state, last_hidden_state, hidden_states, attentions = self._run_token_call(
                state, token_embeds, step_mask, output_hidden_states, output_attentions
            )
            return CallOutput(state, state, None, None, last_hidden_state, hidden_states, attentions)
        pending = pending_mask = keys_values = None
        if cache is not None:
            pending, pending_mask, keys_values = cache.pending, cache.pending_mask, cache.keys_values
            pending = None if pending is None else pending.to(device=state.device, dtype=state.dtype)
            pending_mask = None if pending_mask is None else pending_mask.to(state.device)
            if keys_values and (keys_values[0][0].dtype, keys_values[0][0].device) != (state.dtype, state.device):
                keys_values = None  # the model moved or was cast: build them again
        # a CUDA-graph capture (decode_cuda_graph) runs whole windows: fixed shapes, and no reads of values on the host
        capturing = state.is_cuda and torch.cuda.is_current_stream_capturing()
        if step_mask is not None and not capturing and bool(step_mask.all()):
            step_mask = None  # all ones (a tokenizer's mask, or generate()'s column for a new token): nothing masked
        decoding = (
            cache is not None
            and token_embeds.shape[1] == 1
            and not self.training
            and not (output_hidden_states or output_attentions)
            and step_mask is None
            and not capturing
            and not keep_written
        )
        # one token after a cache: the keys and values of the segment so far are reused
        if decoding and pending_mask is None:
            return self._decode_token(state, token_embeds, pending, keys_values, write_partial_segment)
        if decoding:  # rows at different places in their segments (a left-padded batch)
            return self._decode_token_rows(
                state, token_embeds, pending, pending_mask, keys_values, write_partial_segment
            )
        outputs = (output_hidden_states, output_attentions)
        out = self._run_segment_call(state, token_embeds, step_mask, *outputs, pending, pending_mask, keep_written)
        return out if write_partial_segment else out._replace(state=out.cache_state)

    def _run_token_call(self, state, token_embeds, step_mask, output_hidden_states, output_attentions):
        """The one-token steps of a call: the final state, the token outputs, per-layer outputs and attentions."""
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

    # -- segment steps (segment_length > 1) --------------------------------------------------------------------------

    def _run_segment_call(
        self, state, token_embeds, step_mask, all_layers, attentions, pending, pending_mask, keep_written=False
    ):
        """The segment steps of a call (see `_run_call`)."""
        K = self.config.segment_length
        batch, steps, dim = token_embeds.shape
        held = 0 if pending is None else pending.shape[1]
        stream = token_embeds if pending is None else torch.cat([pending, token_embeds], dim=1)
        valid = order = None
        if step_mask is not None or pending_mask is not None:
            # A masked token is taken out of its row: each row's tokens move to the front, in order, so every row's
            # segments start at its own first token (a left-padded row computes what it computes alone).
            ones = torch.ones(batch, held + steps, dtype=torch.bool, device=stream.device)
            valid = torch.cat(
                [
                    ones[:, :held] if pending_mask is None else pending_mask,
                    ones[:, held:] if step_mask is None else step_mask,
                ],
                dim=1,
            )
            order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
            stream = stream.gather(1, order[..., None].expand(-1, -1, dim))
            valid = valid.gather(1, order)
        length = stream.shape[1]
        segments = -(-length // K)
        padding = segments * K - length
        if padding:  # the last segment is partial: pad it to K with tokens no one reads
            stream = F.pad(stream, (0, 0, 0, padding))
            if valid is None:
                valid = torch.ones(1, length, dtype=torch.bool, device=stream.device)
            valid = F.pad(valid, (0, padding), value=False)

        positions = self.wpe(self.window_positions)
        checkpointed = self.gradient_checkpointing and self.training
        span = (self.config.checkpoint_every_steps or 1) if checkpointed else segments
        final = state
        token_outputs, layer_outputs, attention_outputs, written = [], [], [], []
        for start in range(0, segments, span):
            tokens = slice(start * K, (start + span) * K)
            args = (state, final, stream[:, tokens], None if valid is None else valid[:, tokens], positions, start)
            args += (all_layers, attentions, keep_written)
            run = self._run_segments
            if checkpointed:
                state, final, outputs, per_layer, weights, states = self._gradient_checkpointing_func(run, *args)
            else:
                state, final, outputs, per_layer, weights, states = run(*args)
            token_outputs.append(outputs)
            layer_outputs.append(per_layer)
            attention_outputs.append(weights)
            written.append(states)

        def to_call_order(outputs, dim):  # the stream's positions back to the call's (B, T) positions
            outputs = outputs.narrow(dim, 0, length)
            if order is not None:
                shape = [1] * outputs.ndim
                shape[dim - 1], shape[dim] = batch, length
                where = torch.argsort(order, dim=1).view(shape).expand_as(outputs)
                outputs = outputs.gather(dim, where)
            outputs = outputs.narrow(dim, held, steps)
            if step_mask is not None:  # a masked position has no output of its own
                outputs = outputs * step_mask.view(*([1] * (dim - 1)), batch, steps, 1).to(outputs.dtype)
            return outputs

        last_hidden_state = to_call_order(_join(token_outputs, dim=1), dim=1)
        hidden_states = attention_weights = None
        if all_layers:
            hidden_states = tuple(to_call_order(_join(layer_outputs, dim=2), dim=2).unbind(0))
        if attentions:
            attention_weights = tuple(_join(attention_outputs, dim=3).unbind(0))  # (B, H, segments, 2M+K, 2M+K)
        pending, pending_mask = self._partial_segment(stream, valid if order is not None else None, length)
        out = CallOutput(final, state, pending, pending_mask, last_hidden_state, hidden_states, attention_weights)
        if not keep_written:
            return out
        # the call position of each stream position: -1 for the cache's tokens, masked steps and the padding
        where = torch.arange(-held, steps, device=stream.device).expand(batch, -1)
        if order is not None:
            where = where.gather(1, order).masked_fill(~valid[:, :length], -1)
        where = F.pad(where.clamp(min=-1), (0, padding), value=-1)
        return out._replace(written=_join(written, dim=1), written_positions=where.view(batch, segments, K))

    def _run_segments(self, state, final, stream, valid, positions, start, all_layers, attentions, keep_written=False):
        """
        The segments `start, start + 1, ...` of a call over `stream` `(B, k K, D)`, `valid` `(B or 1, k K)` marking
        its tokens (None: all). Returns the state after the complete segments, the state after every segment (a
        partial one included: `final`), the token outputs `(B, k K, D)` and, with `all_layers` / `attentions`, the
        per-layer token outputs `(L + 1, B, k K, D)` and the windows' weights `(L, B, H, k, 2M + K, 2M + K)`, and with
        `keep_written` the state each segment wrote `(B, k, M, D)`. One function so activation checkpointing can
        recompute `k` segments at a time.
        """
        M, K = self.state_size, self.config.segment_length
        bptt = self.config.bptt_steps
        allowed = segment_mask(M, K, self.config.rebias, stream.device)
        always = torch.ones(1, M, dtype=torch.bool, device=stream.device)
        token_outputs, layer_outputs, attention_outputs, written = [], [], [], []
        for i in range(stream.shape[1] // K):
            s = start + i
            if bptt is not None and s > 0 and s % bptt == 0:
                state = state.detach()
            tokens = stream[:, i * K : (i + 1) * K]
            read = state if self.state_update is None else self.state_update.read(state)
            window = torch.cat([read, tokens, read], dim=1) + positions
            mask = allowed
            if valid is not None:  # keys of absent tokens are read by no one
                present = valid[:, i * K : (i + 1) * K]
                keys = torch.cat(
                    [always.expand(present.shape[0], -1), present, always.expand(present.shape[0], -1)], 1
                )
                mask = allowed & keys[:, None, None, :]
            out, per_layer, weights = self._window(window, all_layers, attentions, mask, slice(M, M + K))
            # the state update's token position: the segment's last token
            if valid is None:
                last_out, last_in = out[:, M + K - 1], tokens[:, K - 1]
            else:
                rows = torch.arange(out.shape[0], device=out.device)
                last = (present * torch.arange(1, K + 1, device=out.device)).argmax(dim=1).expand(out.shape[0])
                last_out, last_in = out[rows, M + last], tokens[rows, last]
            new_state = out[:, M + K :]
            if self.state_update is not None:
                new_state = self.state_update(state, new_state, last_out, last_in)
            if keep_written:
                written.append(new_state)
            if valid is None:
                state = final = new_state
            else:  # a complete segment moves the state on; a partial one (a row's last) only the final state
                final = torch.where(present.any(dim=1)[:, None, None], new_state, final)
                state = torch.where(present.all(dim=1)[:, None, None], new_state, state)
            token_outputs.append(out[:, M : M + K])
            if all_layers:
                layer_outputs.append(per_layer)
            if attentions:
                attention_outputs.append(weights)
        return (
            state,
            final,
            torch.cat(token_outputs, dim=1),
            torch.cat(layer_outputs, dim=2) if all_layers else None,
            torch.stack(attention_outputs, dim=3) if attentions else None,
            torch.stack(written, dim=1) if keep_written else None,
        )

    def _partial_segment(self, stream, valid, length):
        """
        The tokens of each row's last partial segment `(B, P, D)` and which are tokens `(B, P)` (None: all), from the
        call's `stream` of `length` tokens; `valid` marks them where rows differ (None: every row has them all).
        """
        K = self.config.segment_length
        if valid is None:
            held = length % K
            if held == 0:
                return None, None
            return stream[:, length - held : length], None
        count = valid.sum(dim=1, keepdim=True)
        index = count // K * K + torch.arange(K - 1, device=stream.device)
        pending = stream.gather(1, index.clamp(max=stream.shape[1] - 1)[..., None].expand(-1, -1, stream.shape[2]))
        return pending, index < count

    # -- decoding one token within a segment: keys and values reused (docs/design.md#segment-steps) -------------------

    def _extend(self, x, past, mask):
        """The blocks and `ln_f` over new positions `x` that also read the per-block keys and values `past` (None:
        nothing before them) under `mask`; returns their output and the keys and values of every position so far."""
        x = self.drop(x)
        keys_values = []
        for layer, block in enumerate(self.h):
            x, block_keys_values = block.extend(x, None if past is None else past[layer], mask)
            keys_values.append(block_keys_values)
        return self.ln_f(x), keys_values

    def _decode_token(self, state, token_embed, pending, keys_values, write_partial_segment):
        """
        One token `(B, 1, D)` after the `pending` tokens of its segment, from the keys and values of the read slots and
        those tokens (built now if the cache has none). The token costs one window position per block; when it
        completes the segment, the write slots run once and the next segment starts without keys and values.
        """
        M, K = self.state_size, self.config.segment_length
        held = 0 if pending is None else pending.shape[1]
        allowed = segment_mask(M, K, self.config.rebias, state.device)
        positions = self.wpe(self.window_positions)
        read = state if self.state_update is None else self.state_update.read(state)
        if keys_values is None:  # the read slots, then the tokens held, once per segment
            _, keys_values = self._extend(read + positions[:M], None, allowed[:M, :M])
            if held:
                tokens_mask = allowed[M : M + held, : M + held]
                _, keys_values = self._extend(pending + positions[M : M + held], keys_values, tokens_mask)
        # the new token reads the read slots, the tokens before it and itself: every key
        out, keys_values = self._extend(token_embed + positions[M + held : M + held + 1], keys_values, None)
        pending = token_embed if pending is None else torch.cat([pending, token_embed], dim=1)
        held += 1
        if held < K and not write_partial_segment:
            return CallOutput(state, state, pending, None, out, None, None, keys_values)
        # the write slots read the read slots, the tokens and each other (those of a partial segment: its r tokens)
        keys = torch.cat(
            [torch.arange(M + held, device=state.device), torch.arange(M + K, 2 * M + K, device=state.device)]
        )
        written, _ = self._extend(read + positions[M + K :], keys_values, allowed[M + K :][:, keys])
        new_state = (
            written if self.state_update is None else self.state_update(state, written, out[:, -1], token_embed[:, -1])
        )
        if held == K:
            return CallOutput(new_state, new_state, None, None, out, None, None, None)
        return CallOutput(new_state, state, pending, None, out, None, None, keys_values)

    def _decode_token_rows(self, state, token_embed, pending, pending_mask, keys_values, write_partial_segment):
        """
        `_decode_token` for rows at different places in their segments (a left-padded batch): each row's partial
        segment is held `K - 1` wide with `pending_mask` marking its tokens, the keys and values `M + K` wide, and
        each row's new token goes to its own position. The write slots run when a row completes its segment (kept for
        the rows that did, whose read slots then start again), or for every row with `write_partial_segment`.
        """
        M, K = self.state_size, self.config.segment_length
        batch, device = state.shape[0], state.device
        allowed = segment_mask(M, K, self.config.rebias, device)
        positions = self.wpe(self.window_positions)
        read = state if self.state_update is None else self.state_update.read(state)
        slots = torch.ones(batch, M, dtype=torch.bool, device=device)
        held = pending_mask.sum(dim=1)
        if keys_values is None:
            keys_values = self._row_keys_values(read, pending, pending_mask, allowed, positions)
        # the new token reads the read slots, the tokens its row holds, and itself
        here = M + held
        keys = torch.cat([slots, torch.arange(K, device=device) < held[:, None], slots[:, :1]], dim=1)
        out, extended = self._extend(token_embed + positions[here][:, None], keys_values, keys[:, None, None, :])
        at = here.view(batch, 1, 1, 1)
        keys_values = [
            tuple(kv[:, :, :-1].scatter(2, at.expand(-1, kv.shape[1], 1, kv.shape[3]), kv[:, :, -1:]) for kv in pair)
            for pair in extended
        ]
        held = held + 1
        complete = held == K
        tokens = torch.arange(K, device=device) < held[:, None]
        at = (held - 1).clamp(max=K - 2).view(batch, 1, 1).expand(-1, 1, token_embed.shape[2])
        pending = pending.scatter(1, at, token_embed)
        pending_mask = tokens[:, : K - 1] & ~complete[:, None]
        any_complete = bool(complete.any())
        if not (write_partial_segment or any_complete):
            return CallOutput(state, state, pending, pending_mask, out, None, None, keys_values)
        write_keys = torch.cat([slots, tokens, slots], dim=1)
        written, _ = self._extend(
            read + positions[M + K :], keys_values, allowed[M + K :] & write_keys[:, None, None, :]
        )
        if self.state_update is not None:
            written = self.state_update(state, written, out[:, -1], token_embed[:, -1])
        done = complete[:, None, None]
        cache_state = torch.where(done, written, state)
        if any_complete:  # those rows start a new segment: the read slots of their new state, no tokens yet
            new_read = cache_state if self.state_update is None else self.state_update.read(cache_state)
            fresh = self._row_keys_values(new_read, None, None, allowed, positions)
            keys_values = [
                tuple(torch.where(done[..., None], new, old) for new, old in zip(fresh_pair, pair, strict=True))
                for fresh_pair, pair in zip(fresh, keys_values, strict=True)
            ]
        final = written if write_partial_segment else cache_state
        return CallOutput(final, cache_state, pending, pending_mask, out, None, None, keys_values)

    def _row_keys_values(self, read, pending, pending_mask, allowed, positions):
        """Per block, the keys and values `(B, H, M + K, head_dim)` of the read slots and the `K - 1` positions of
        the partial segment `pending` (None: none yet); the positions no row holds a token at are read by no one."""
        M, K = self.state_size, self.config.segment_length
        _, keys_values = self._extend(read + positions[:M], None, allowed[:M, :M])
        width = M
        if pending is not None:
            keys = torch.cat([torch.ones_like(pending_mask[:, :1]).expand(-1, M), pending_mask], dim=1)
            tokens_mask = allowed[M : M + K - 1, : M + K - 1] & keys[:, None, None, :]
            _, keys_values = self._extend(pending + positions[M : M + K - 1], keys_values, tokens_mask)
            width = M + K - 1
        return [tuple(F.pad(kv, (0, 0, 0, M + K - width)) for kv in pair) for pair in keys_values]
