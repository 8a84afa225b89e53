"""Step efficiency: GPTB over (B, T) tokens against T runs of transformers' `GPT2Model` over (B, M + 1) windows.

The baseline is the same recurrence built from stock parts: each step feeds the window `[state, wte(token)]` to a
`GPT2Model` holding GPTB's weights (`inputs_embeds`; GPT-2 adds the positions and applies its causal mask), takes the
next state from the first M outputs and the logits from the last. Both run inference (no_grad) and training (forward
and backpropagation through time). Model FLOPs utilisation is the model's FLOPs per second over the machine's
measured matmul rate at the step's GEMM shapes, timed interleaved with the models.
"""

import torch
import torch.nn.functional as F

from .common import Context, compare, fmt_time, gpt2_twin, gptb_model, row, step_flops
from .matmul import gemm_set

GOALS = {"cpu": {"inference": 0.70, "training": 0.50}, "cuda": {"inference": 0.50, "training": 0.35}}


def gpt2_recurrence(twin, lm_head, initial, tokens, train: bool):
    """The GPTB recurrence with a stock `GPT2Model` as the step; with `train`, the loss is backpropagated."""
    batch, steps = tokens.shape
    state = initial.expand(batch, -1, -1)
    embeds = twin.wte(tokens)
    logits = []
    for t in range(steps):
        window = torch.cat([state, embeds[:, t : t + 1]], dim=1)
        out = twin(inputs_embeds=window, use_cache=False).last_hidden_state
        state = out[:, :-1]
        logits.append(lm_head(out[:, -1]))
    logits = torch.stack(logits, dim=1)
    if train:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()


def run(ctx: Context) -> dict:
    sizes = ctx.sizes
    model = gptb_model(ctx)
    twin = gpt2_twin(model, "GPT2Model")
    tokens = torch.randint(0, sizes.vocab_size, (sizes.batch, sizes.steps), device=ctx.device)
    initial = model.transformer.initial_embeds
    gemms, gemm_flops = gemm_set(ctx)
    flops = sizes.steps * step_flops(sizes)
    goals = GOALS["cuda" if ctx.cuda else "cpu"]
    applies = ctx.cuda or (sizes.n_embd >= 384 and sizes.dtype == "float32")

    @torch.no_grad()
    def gptb_inference():
        model(tokens, use_cache=False)

    @torch.no_grad()
    def gpt2_inference():
        gpt2_recurrence(twin, model.lm_head, initial, tokens, train=False)

    def gptb_training():
        model(tokens, labels=tokens, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    def gpt2_training():
        gpt2_recurrence(twin, model.lm_head, initial, tokens, train=True)
        twin.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)

    rows, data = [], {"model_flops_per_step": step_flops(sizes), "steps": sizes.steps}
    for mode, ours, baseline, factor in (
        ("inference", gptb_inference, gpt2_inference, 1),
        ("training", gptb_training, gpt2_training, 3),
    ):
        model.train(mode == "training")
        twin.train(mode == "training")
        times = compare({"gptb": ours, "gpt2": baseline, "gemms": gemms}, ctx.device, repeats=sizes.repeats)
        rate = gemm_flops / times["gemms"]
        mfu = factor * flops / times["gptb"] / rate
        mfu_gpt2 = factor * flops / times["gpt2"] / rate
        goal = goals[mode]
        rows.append(
            row(
                f"{mode}: time for {sizes.steps} steps (B={sizes.batch}, M={sizes.state_size}) vs GPT2Model windows",
                fmt_time(times["gptb"]),
                fmt_time(times["gpt2"]),
                f"{times['gptb'] / times['gpt2']:.2f}x",
            )
        )
        rows.append(
            row(
                f"{mode}: model FLOPs utilisation (of the step-GEMM rate)",
                f"{mfu:.0%}",
                f"{mfu_gpt2:.0%}",
                goal=f">= {goal:.0%}" if applies else "",
                met=(mfu >= goal) if applies else None,
            )
        )
        data[mode] = {
            "seconds": times["gptb"],
            "baseline_seconds": times["gpt2"],
            "time_ratio": times["gptb"] / times["gpt2"],
            "matmul_rate": rate,
            "mfu": mfu,
            "baseline_mfu": mfu_gpt2,
            "goal": goal if applies else None,
        }
    model.eval()
    if ctx.cuda:  # small batches on a GPU are bound by launches: the cost of one step at batch 1
        one = tokens[:1]
        with torch.no_grad():
            single = compare({"b1": lambda: model(one, use_cache=False)}, ctx.device, repeats=sizes.repeats)["b1"]
        per_step = single / sizes.steps
        rows.append(row("inference: time per step at batch 1 (launch overhead)", fmt_time(per_step)))
        data["batch1_step_seconds"] = per_step
    return {"rows": rows, "data": data}
