"""Generation: per-token latency over positions, cache memory per sequence, and tokens/s at a fixed memory budget.

GPTB against transformers' `GPT2LMHeadModel` with its KV cache, on the same dimensions and weights (GPT-2's position
table is widened where the run goes past 1,024 positions). Both decode greedily, one token per call with their cache.

Latency: one pass decodes positions 1..N with both models, token by token, keeping each model's cache at a few
checkpoint positions. Then the checkpoints are timed interleaved, round after round (every model at every checkpoint
once per round, each step taken from the saved cache), so that a neighbour who starts or stops mid-run shifts all
positions alike instead of reading as a slope. The per-token times of the first pass are kept in the JSON.

CUDA-graph decoding (`config.decode_cuda_graph`, CUDA only): the same weights decode greedily eagerly and from the
captured graph, side by side; the tokens must be the same and the per-token latency is timed interleaved.
"""

import copy
import statistics

import torch
from transformers import DynamicCache

from modeling_gptb import GPTBCache
from modeling_gptb.cuda_graphs import DecodeGraphs

from .common import Context, fmt_bytes, fmt_time, gpt2_twin, gptb_model, row, time_once


class Decoder:
    """Greedy decoding one token per call, carrying the model's cache."""

    def __init__(self, model, batch: int, cache=None):
        self.model, self.cache = model, cache
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=model.device)

    @torch.no_grad()
    def step(self):
        out = self.model(self.token, cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.logits = out.logits[:, -1]
        self.token = self.logits[:, None].argmax(-1)


def kv_bytes(cache) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def checkpoints(n: int) -> list[int]:
    """Positions (1-based: the token decoded with `p - 1` tokens in the cache) where latency is reported."""
    return sorted({1, max(1, n // 8), max(1, n // 2), n} | ({1024} if n >= 1024 else set()))


def latency(ctx: Context, gptb, gpt2) -> dict:
    n, rounds = ctx.sizes.gen_positions, ctx.sizes.gen_latency_rounds
    positions = checkpoints(n)
    ours, theirs = Decoder(gptb, 1), Decoder(gpt2, 1)
    saved = {"gptb": {}, "gpt2": {}}
    sequential = {"gptb": [], "gpt2": []}
    kv_at = {}
    for position in range(1, n + 1):
        if position in positions:  # the caches as they are before decoding this position's token
            saved["gptb"][position] = None if ours.cache is None else GPTBCache(ours.cache.state, position - 1)
            saved["gpt2"][position] = copy.deepcopy(theirs.cache)
        sequential["gptb"].append(time_once(ours.step, ctx.device))
        sequential["gpt2"].append(time_once(theirs.step, ctx.device))
        if position in (128, n):
            kv_at[position] = kv_bytes(theirs.cache)

    def step_from(name, model, position):
        decoder = Decoder(model, 1, saved[name][position])

        def run():
            decoder.step()
            if name == "gpt2" and position > 1:
                decoder.cache.crop(-1)  # back to the checkpoint for the next round

        return run

    steps = {
        (name, position): step_from(name, model, position)
        for position in positions
        for name, model in (("gptb", gptb), ("gpt2", gpt2))
    }
    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key, run in steps.items():
            times[key].append(time_once(run, ctx.device))
    at = {name: {p: statistics.median(times[name, p]) for p in positions} for name in ("gptb", "gpt2")}
    return {"at": at, "sequential": sequential, "kv_bytes": kv_at, "state_bytes": ours.cache.state.nbytes}


def slope(at: dict) -> float:
    """Least-squares seconds per position through the checkpoint latencies."""
    return statistics.linear_regression(list(at), list(at.values())).slope


def budget_throughput(ctx: Context, gptb, gpt2) -> dict:
    """Tokens/s of batched decoding with the sequences that fit in the budget (capped), GPT-2 at half its context."""
    sizes, device, dtype = ctx.sizes, ctx.device, ctx.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    context, budget = sizes.gen_context, sizes.gen_budget_bytes
    per_seq = {
        "gptb": sizes.state_size * sizes.n_embd * itemsize,
        "gpt2": 2 * sizes.n_layer * context * sizes.n_embd * itemsize,
    }
    fit = {name: budget // size for name, size in per_seq.items()}
    batch = {name: max(1, min(count, sizes.gen_batch_cap)) for name, count in fit.items()}
    # GPT-2's cache is filled with random keys and values up to half the context (decode cost does not read values).
    cache = DynamicCache(config=gpt2.config)
    head_dim = sizes.n_embd // sizes.n_head
    for layer in range(sizes.n_layer):
        shape = (batch["gpt2"], sizes.n_head, context // 2, head_dim)
        cache.update(
            torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype), layer
        )
    state = gptb.transformer.initial_state(batch["gptb"]).detach().clone()
    decoders = {
        "gptb": Decoder(gptb, batch["gptb"], GPTBCache(state, context // 2)),
        "gpt2": Decoder(gpt2, batch["gpt2"], cache),
    }
    for decoder in decoders.values():
        decoder.step()  # warm-up
    times = {name: [] for name in decoders}
    for _ in range(sizes.gen_timed_steps):
        for name, decoder in decoders.items():
            times[name].append(time_once(decoder.step, device))
    tokens_per_s = {name: batch[name] / statistics.median(times[name]) for name in decoders}
    return {"per_seq_bytes": per_seq, "fit": fit, "batch": batch, "tokens_per_s": tokens_per_s}


GRAPH_GOAL_SECONDS = 0.5e-3  # issue 10: gptb-small, batch 1, on an H200


def graph_twin(model):
    """The same weights with `decode_cuda_graph` on (its own config and graphs; modules and parameters shared)."""
    twin = copy.copy(model)
    twin.config = copy.deepcopy(model.config)
    twin.config.decode_cuda_graph = True
    twin.decode_graphs = DecodeGraphs()
    return twin


def graph_decoding(ctx: Context, gptb) -> tuple[list[dict], dict]:
    """Greedy decoding eagerly and from the CUDA graph, batch 1: same tokens, logits gap, per-token latency."""
    measure = "latency per token, CUDA-graph decoding vs eager (batch 1)"
    if not ctx.cuda:
        reason = "skipped: CUDA graphs need --device cuda"
        return [row(measure, reason, goal="<= 0.5 ms")], {"skipped": reason}
    decoders = {"eager": Decoder(gptb, 1), "graph": Decoder(graph_twin(gptb), 1)}
    tokens, logits_gap = {name: [] for name in decoders}, 0.0
    for _ in range(max(8, ctx.sizes.gen_positions // 8)):
        for name, decoder in decoders.items():
            decoder.step()
            tokens[name].append(int(decoder.token))
        gap = (decoders["graph"].logits.float() - decoders["eager"].logits.float()).abs().max()
        logits_gap = max(logits_gap, float(gap))
    same = tokens["graph"] == tokens["eager"]
    times = {name: [] for name in decoders}
    for _ in range(ctx.sizes.gen_latency_rounds):
        for name, decoder in decoders.items():
            times[name].append(time_once(decoder.step, ctx.device))
    seconds = {name: statistics.median(values) for name, values in times.items()}
    at_goal_sizes = ctx.sizes.name == "gpu"
    rows = [
        row(
            measure,
            fmt_time(seconds["graph"]),
            fmt_time(seconds["eager"]),
            f"{seconds['graph'] / seconds['eager']:.2f}x",
            goal="<= 0.5 ms" if at_goal_sizes else "",
            met=seconds["graph"] <= GRAPH_GOAL_SECONDS if at_goal_sizes else None,
        ),
        row(
            f"CUDA-graph greedy tokens equal eager ({len(tokens['eager'])} tokens; max logit gap {logits_gap:.3g})",
            "same" if same else "differ",
            goal="same tokens",
            met=same,
        ),
    ]
    data = {"seconds": seconds, "same_tokens": same, "tokens": tokens, "max_logit_gap": logits_gap}
    return rows, data


def run(ctx: Context) -> dict:
    sizes = ctx.sizes
    n = sizes.gen_positions
    gptb = gptb_model(ctx)
    gpt2 = gpt2_twin(gptb, "GPT2LMHeadModel", n_positions=max(1024, n + 4, sizes.gen_context + 4))
    lat = latency(ctx, gptb, gpt2)
    at = lat["at"]
    positions = checkpoints(n)
    rows, data = [], {"positions": positions}
    for position in positions:
        ours, theirs = at["gptb"][position], at["gpt2"][position]
        rows.append(
            row(
                f"latency per token at position {position:,} (batch 1)",
                fmt_time(ours),
                fmt_time(theirs),
                f"{ours / theirs:.2f}x",
            )
        )
    slopes = {name: slope(at[name]) for name in at}
    rise = at["gptb"][n] / at["gptb"][1] - 1
    rows.append(
        row(
            f"latency slope per 1,000 positions (GPTB at {n:,} vs 1: {rise:+.1%})",
            fmt_time(1000 * slopes["gptb"]),
            fmt_time(1000 * slopes["gpt2"]),
            goal="flat (within 10%)",
            met=abs(rise) < 0.10,
        )
    )
    data["latency_seconds"] = at
    data["slope_seconds_per_position"] = slopes
    data["relative_change_over_run"] = rise
    data["sequential_latency_seconds"] = lat["sequential"]
    if n >= 1024:
        ours, theirs = statistics.median(at["gptb"].values()), at["gpt2"][1024]
        rows.append(
            row(
                "median latency per token vs GPT-2 with a 1,024-token cache (batch 1)",
                fmt_time(ours),
                fmt_time(theirs),
                f"{ours / theirs:.2f}x",
                goal="<= 1.0x" if ctx.cuda else "",
                met=(ours <= theirs) if ctx.cuda else None,
            )
        )
        data["vs_gpt2_at_1024"] = ours / theirs

    itemsize = torch.empty((), dtype=ctx.dtype).element_size()
    state_bytes = sizes.state_size * sizes.n_embd * itemsize
    for tokens in (128, 1024, 8192):
        kv = 2 * sizes.n_layer * tokens * sizes.n_embd * itemsize
        rows.append(
            row(
                f"cache per sequence at {tokens:,} tokens",
                fmt_bytes(state_bytes),
                fmt_bytes(kv),
                f"{state_bytes / kv:.3f}x",
            )
        )
    data["state_bytes"] = {"computed": state_bytes, "measured": lat["state_bytes"]}
    data["kv_bytes_measured"] = lat["kv_bytes"]
    measured = ", ".join(f"{fmt_bytes(b)} at {p}" for p, b in sorted(lat["kv_bytes"].items()))
    rows.append(row("measured cache allocation", fmt_bytes(lat["state_bytes"]), measured))

    graph_rows, data["cuda_graph"] = graph_decoding(ctx, gptb)
    rows += graph_rows

    budget = budget_throughput(ctx, gptb, gpt2)
    data["budget"] = budget
    fit, batch, speed = budget["fit"], budget["batch"], budget["tokens_per_s"]
    rows.append(
        row(
            f"sequences that fit in {fmt_bytes(sizes.gen_budget_bytes)} of cache (context {sizes.gen_context:,})",
            f"{fit['gptb']:,}",
            f"{fit['gpt2']:,}",
            f"{fit['gptb'] / max(1, fit['gpt2']):.0f}x",
        )
    )
    rows.append(
        row(
            f"batched decoding tokens/s at that budget (batch {batch['gptb']} vs {batch['gpt2']}, "
            f"cap {sizes.gen_batch_cap})",
            f"{speed['gptb']:,.0f}",
            f"{speed['gpt2']:,.0f}",
            f"{speed['gptb'] / speed['gpt2']:.2f}x",
        )
    )
    return {"rows": rows, "data": data}
