"""Segment steps (`segment_length` K, docs/design.md#segment-steps): for each K, training tokens/s against
transformers' `GPT2LMHeadModel` of the same width and depth at context K, and batch-1 decode time per token against
GPT-2 with its KV cache at several positions.

Training: GPTB reads sequences of two segments (2K tokens; 16 one-token steps at K = 1) so the state is carried; GPT-2
reads sequences of K tokens; both see the same number of tokens per batch, timed interleaved. Decoding: each model
first reads a prompt up to the position (GPTB's cache then holds a whole number of segments), then the time to decode
is measured from that cache, round after round: GPTB decodes a whole segment (K tokens, its write slots included) and
reports the time per token, GPT-2 one token (its cache cropped back after).
"""

import torch

from modeling_gptb.throughput import forward_flops_per_token

from .common import Context, compare, fmt_time, gpt2_twin, gptb_model, row
from .matmul import gemm_set

SEGMENT_LENGTHS = (1, 16, 64)
POSITIONS = (64, 1024, 4096)
# at K = 64: train >= 0.7x GPT-2's tokens/s, decode <= 1.5x GPT-2's time at 1,024, inference MFU >= 70%; decode
# time flat (+-10%) over the positions, at every K
GOALS = {"training": 0.7, "decode": 1.5, "flat": 0.10, "mfu": 0.70}


def scaled(sizes):
    """The segment lengths and positions of the run: the issue's, or small ones for the smoke-test sizes."""
    if sizes.name == "tiny":
        return (1, 2, 4), (4, 8, 16)
    return SEGMENT_LENGTHS, POSITIONS


def step_rates(ctx: Context, gptb, gpt2, K: int) -> dict:
    """
    Tokens/s of a training step (forward, backward) of each model on the same number of tokens, and GPTB's inference
    model FLOPs utilisation: its model FLOPs per second over the machine's matmul rate at the shapes of its window's
    GEMMs (batch x window rows), timed interleaved.
    """
    batch = ctx.sizes.batch
    gptb_length = 16 if K == 1 else 2 * K
    tokens = batch * gptb_length
    ours = torch.randint(0, ctx.sizes.vocab_size, (batch, gptb_length), device=ctx.device)
    theirs = ours.reshape(tokens // K, K) if K > 1 else ours.reshape(tokens, 1)
    gemms, gemm_flops = gemm_set(ctx, rows=batch * gptb.config.window_size)

    def gptb_step():
        gptb(ours, labels=ours, use_cache=False).loss.backward()
        gptb.zero_grad(set_to_none=True)

    def gpt2_step():
        gpt2(theirs, labels=theirs, use_cache=False).loss.backward()
        gpt2.zero_grad(set_to_none=True)

    @torch.no_grad()
    def gptb_inference():
        gptb(ours, use_cache=False)

    gptb.train(), gpt2.train()
    train = compare({"gptb": gptb_step, "gpt2": gpt2_step}, ctx.device, repeats=ctx.sizes.repeats)
    gptb.eval(), gpt2.eval()
    infer = compare({"gptb": gptb_inference, "gemms": gemms}, ctx.device, repeats=ctx.sizes.repeats)
    model_flops = forward_flops_per_token(gptb.config) * tokens
    mfu = model_flops / infer["gptb"] / (gemm_flops / infer["gemms"])
    return {"gptb": tokens / train["gptb"], "gpt2": tokens / train["gpt2"], "inference_mfu": mfu}


@torch.no_grad()
def decoding(ctx: Context, gptb, gpt2, K: int, positions) -> dict:
    """Seconds per decoded token at each position, GPTB averaged over a whole segment."""
    device = ctx.device
    prompt = torch.randint(0, ctx.sizes.vocab_size, (1, max(positions)), device=device)
    token = prompt[:, :1]
    fns = {}
    for position in positions:
        start = position // K * K  # GPTB's cache at a segment boundary
        gptb_cache = gptb(prompt[:, :start], use_cache=True).cache if start else None
        gpt2_cache = gpt2(prompt[:, : position - 1], use_cache=True).cache

        def gptb_segment(cache=gptb_cache):
            for _ in range(K):
                cache = gptb(token, cache=cache, use_cache=True, write_partial_segment=False).cache

        def gpt2_token(cache=gpt2_cache):
            gpt2(token, cache=cache, use_cache=True)
            cache.crop(-1)  # back to the position for the next round

        fns["gptb", position], fns["gpt2", position] = gptb_segment, gpt2_token
    times = compare(fns, device, repeats=ctx.sizes.gen_latency_rounds)
    return {position: {"gptb": times["gptb", position] / K, "gpt2": times["gpt2", position]} for position in positions}


def run(ctx: Context) -> dict:
    lengths, positions = scaled(ctx.sizes)
    rows, data = [], {"training_tokens_per_s": {}, "decode_seconds_per_token": {}}
    for K in lengths:
        gptb = gptb_model(ctx, segment_length=K)
        gpt2 = gpt2_twin(gptb, "GPT2LMHeadModel", n_positions=max(positions) + 1)
        rates = data["training_tokens_per_s"][K] = step_rates(ctx, gptb, gpt2, K)
        ratio = rates["gptb"] / rates["gpt2"]
        checked = K == max(lengths)
        rows.append(
            row(
                f"K={K}: training tokens/s vs GPT2LMHeadModel at context {K}",
                f"{rates['gptb']:,.0f}",
                f"{rates['gpt2']:,.0f}",
                f"{ratio:.2f}x",
                f">= {GOALS['training']}x" if checked else "",
                ratio >= GOALS["training"] if checked else None,
            )
        )
        rows.append(
            row(
                f"K={K}: inference model FLOPs utilisation (of the window-GEMM rate)",
                f"{rates['inference_mfu']:.0%}",
                goal=f">= {GOALS['mfu']:.0%}" if checked else "",
                met=rates["inference_mfu"] >= GOALS["mfu"] if checked else None,
            )
        )
        decode = data["decode_seconds_per_token"][K] = decoding(ctx, gptb, gpt2, K, positions)
        for position in positions:
            ours, theirs = decode[position]["gptb"], decode[position]["gpt2"]
            checked = K == max(lengths) and position == positions[1]
            goal = f"<= {GOALS['decode']}x" if checked else ""
            rows.append(
                row(
                    f"K={K}: batch-1 decode time/token at position {position:,} vs GPT-2 with KV cache",
                    fmt_time(ours),
                    fmt_time(theirs),
                    f"{ours / theirs:.2f}x",
                    goal,
                    ours / theirs <= GOALS["decode"] if checked else None,
                )
            )
        per_token = [decode[p]["gptb"] for p in positions]
        spread = max(per_token) / min(per_token) - 1
        rows.append(
            row(
                f"K={K}: GPTB decode time/token, spread from position {positions[0]:,} to {positions[-1]:,}",
                f"{spread:+.0%}",
                goal=f"<= {GOALS['flat']:.0%}",
                met=spread <= GOALS["flat"],
            )
        )
    return {"rows": rows, "data": data}
