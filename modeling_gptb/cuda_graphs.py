"""CUDA-graph decoding: generate()'s one-token steps replayed from a captured graph (`config.decode_cuda_graph`).

A batch-1 step of gptb-small is ~180 small kernels, so on a GPU it is bound by launches, not arithmetic. Captured once
as a CUDA graph over static buffers (token ids, state, update mask), the step is one launch per token. The captured
function is the model's own eager step, so the graph computes exactly what the eager path does; the eager path stays
and is what a CPU runs. See `docs/design.md` for the switch and its rules.

This file travels to the Hub as remote code: it imports only the standard library and torch.
"""

import warnings

import torch


class CUDAGraph:
    """`torch.cuda.graph` capture and replay of one step (warm-up on a side stream first, as torch requires)."""

    devices = ("cuda",)
    warmup_calls = 3

    def __init__(self):
        self.graph = None

    def capture(self, step):
        """Run `step()` under capture; returns its outputs, which every `replay()` overwrites in place."""
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(self.warmup_calls):
                step()
        torch.cuda.current_stream().wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            outputs = step()
        return outputs

    def replay(self):
        self.graph.replay()


class CapturedDecodeStep:
    """
    One captured step: static input buffers, the graph, and its output buffers. With segment steps
    (`segment_length` K > 1) the cache's partial segment is a static input too, always `K - 1` tokens wide with a mask
    of which are held, so one graph serves every position in a segment.
    """

    def __init__(self, model, batch_size: int, graph, cache_type):
        config, device = model.config, model.device
        self.token_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.state = torch.zeros(batch_size, config.state_size, config.n_embd, dtype=model.dtype, device=device)
        self.update_mask = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.segments = config.segment_length > 1
        held = config.segment_length - 1
        self.pending = torch.zeros(batch_size, held, config.n_embd, dtype=model.dtype, device=device)
        self.pending_mask = torch.zeros(batch_size, held, dtype=torch.bool, device=device)
        self.weights = weights_signature(model)
        self.graph = graph
        if self.segments:
            inputs = (self.token_ids, self.state, self.pending, self.pending_mask, self.update_mask)
            self.outputs = graph.capture(lambda: eager_segment_decode_step(model, cache_type, *inputs))
        else:
            self.outputs = graph.capture(
                lambda: eager_decode_step(model, self.token_ids, self.state, self.update_mask)
            )

    def __call__(self, input_ids, cache, update_mask):
        """Logits, the state after the token, and the cache's state, partial segment and its mask after it."""
        self.token_ids.copy_(input_ids)
        self.state.copy_(cache.state)
        if update_mask is None:
            self.update_mask.fill_(True)
        else:
            self.update_mask.copy_(update_mask)
        if self.segments:
            held = 0 if cache.pending is None else cache.pending.shape[1]
            self.pending.zero_()
            self.pending_mask.fill_(False)
            if held:
                self.pending[:, :held].copy_(cache.pending)
                self.pending_mask[:, :held] = True if cache.pending_mask is None else cache.pending_mask
        self.graph.replay()
        # the next replay overwrites the output buffers: hand out copies
        outputs = tuple(output.clone() for output in self.outputs)
        if not self.segments:
            logits, state = outputs
            return logits, state, state, None, None
        return outputs


def eager_decode_step(model, token_ids, state, update_mask):
    """
    The captured function: the model's eager step over the static buffers, without ART and without an attention
    mask (its all-ones test would read the values on the host); where `update_mask` is False the state is kept, as a
    0 in `attention_mask` does. Under capture the model's value checks (token ids in range, a finite state) become
    device-side asserts, checked at every replay (`validation.ValueChecks`).
    """
    out = model(input_ids=token_ids, past_hidden_states=state, use_cache=False, art_mode="off", return_dict=True)
    new_state = torch.where(update_mask[:, None, None], out.past_hidden_states, state)
    return out.logits, new_state


def eager_segment_decode_step(model, cache_type, token_ids, state, pending, pending_mask, update_mask):
    """
    The captured function for segment steps: the model's eager call from a cache of `cache_type` holding `state` and
    the partial segment (`pending`, `pending_mask`), where `update_mask` False takes the token out as a 0 in
    `attention_mask` does. Every shape is fixed: a masked call keeps its partial segment `K - 1` wide.
    """
    cache = cache_type(state, 0, pending, pending_mask)
    # the body and the head, as the eager forward runs them without labels and ART (the model's own forward would
    # take this graph path again)
    out = model.transformer(input_ids=token_ids, cache=cache, attention_mask=update_mask[:, None], use_cache=True)
    logits = model.lm_head(out.last_hidden_state)
    return logits, out.past_hidden_states, out.cache.state, out.cache.pending, out.cache.pending_mask


def weights_signature(model) -> tuple:
    """Where the weights live: a graph reads them by address, so moving or casting the model needs a new capture."""
    return tuple(param.data_ptr() for param in model.parameters())


class DecodeGraphs:
    """
    The captured decode steps of one model, one per (batch size, dtype, device), captured on first use and replayed
    after. `graph_factory` makes the capture/replay object (`CUDAGraph`; tests pass a stand-in that replays by calling
    the step again); its `devices` are where it applies. Past `max_graphs` captures, new shapes decode eagerly.
    """

    def __init__(self, graph_factory=CUDAGraph, max_graphs: int = 8):
        self.graph_factory = graph_factory
        self.max_graphs = max_graphs
        self.steps = {}

    def __deepcopy__(self, memo):
        # a copied model has its own weights: it captures its own graphs
        return DecodeGraphs(self.graph_factory, self.max_graphs)

    def __getstate__(self):
        return {"graph_factory": self.graph_factory, "max_graphs": self.max_graphs, "steps": {}}

    def applies(self, model, input_ids, cache_state, **other_inputs) -> bool:
        """Whether this call is a one-token decode step the graph computes exactly like the eager path."""
        if model.training or torch.is_grad_enabled() or cache_state is None:
            return False
        if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] != 1 or input_ids.dtype != torch.long:
            return False
        if model.device.type not in self.graph_factory.devices or input_ids.device != model.device:
            return False
        if tuple(cache_state.shape) != (input_ids.shape[0], model.config.state_size, model.config.n_embd):
            return False
        # labels, a starting state, embeddings, hidden states or an ART memory that learns: the eager path
        return all(value is None or value is False for value in other_inputs.values())

    def decode(self, model, input_ids, cache, attention_mask=None):
        """
        For one token per sequence after `cache` (a `GPTBCache`): logits `(batch_size, 1, vocab_size)`, the state
        after the token, and the next cache's state, partial segment and its mask (None, None for one-token steps),
        replayed from the captured graph of this batch size (captured now if new); None when this shape is left to the
        eager path.
        """
        batch_size = input_ids.shape[0]
        key = (batch_size, model.dtype, model.device)
        step = self.steps.get(key, False)
        if step and step.weights != weights_signature(model):
            del self.steps[key]
            step = False
        if step is False:
            if len(self.steps) >= self.max_graphs:
                return None
            step = self.steps[key] = self._capture(model, batch_size, type(cache))
        if step is None:
            return None
        update_mask = None
        if attention_mask is not None:
            update_mask = attention_mask[:, -1].to(torch.bool)
        return step(input_ids, cache, update_mask)

    def _capture(self, model, batch_size, cache_type):
        try:
            return CapturedDecodeStep(model, batch_size, self.graph_factory(), cache_type)
        except Exception as error:  # a capture the device refuses: this shape decodes eagerly from now on
            warnings.warn(
                f"decode_cuda_graph: capturing the decode step for batch size {batch_size} failed "
                f"({type(error).__name__}: {error}); decoding it eagerly",
                stacklevel=3,
            )
            return None


__all__ = ["CUDAGraph", "DecodeGraphs"]
