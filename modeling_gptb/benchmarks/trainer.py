"""Trainer overhead: tokens/s of a tiny GPTB model through HF `Trainer` against a plain PyTorch loop.

Both run the same model (fresh, same seed), data, optimizer (AdamW, fused where torch has it), linear schedule and
gradient clipping at 1.0; Trainer with saving, logging and progress bars off. Each run times the steps after a
warm-up; the runs alternate Trainer, plain, Trainer, plain, ... and each side gets the median.
"""

import contextlib
import io
import statistics
import tempfile
import time
import warnings

import torch
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    get_linear_schedule_with_warmup,
)

from .common import Context, row, sync

LEARNING_RATE = 1e-3


class Clock(TrainerCallback):
    """The time at the end of every optimizer step."""

    def __init__(self, device):
        self.device, self.ticks = device, []

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.ticks.append(time.perf_counter())


def model_and_data(ctx: Context):
    from modeling_gptb import GPTBConfig, GPTBLMHeadModel

    sizes = ctx.sizes
    torch.manual_seed(0)
    config = GPTBConfig(
        **sizes.trainer_model, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0
    )
    model = GPTBLMHeadModel(config).to(ctx.device)
    count = sizes.trainer_batch * (sizes.trainer_warmup_steps + sizes.trainer_steps)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (count, sizes.trainer_seq_len), generator=generator)
    return model, [{"input_ids": t, "labels": t} for t in tokens]


def seconds_per_timed_steps(ticks, warmup) -> float:
    return ticks[-1] - ticks[warmup - 1]


def run_trainer(ctx: Context) -> float:
    sizes = ctx.sizes
    model, data = model_and_data(ctx)
    clock = Clock(ctx.device)
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(
            output_dir=folder,
            per_device_train_batch_size=sizes.trainer_batch,
            max_steps=sizes.trainer_warmup_steps + sizes.trainer_steps,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not ctx.cuda,
            bf16=ctx.cuda,
            seed=0,
        )
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # Trainer prints its metrics
            warnings.simplefilter("ignore")
            Trainer(model=model, args=args, train_dataset=data, callbacks=[clock]).train()
    return seconds_per_timed_steps(clock.ticks, sizes.trainer_warmup_steps)


def run_plain(ctx: Context) -> float:
    sizes = ctx.sizes
    model, data = model_and_data(ctx)
    model.train()
    loader = torch.utils.data.DataLoader(
        data, batch_size=sizes.trainer_batch, shuffle=True, collate_fn=default_data_collator
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    total = sizes.trainer_warmup_steps + sizes.trainer_steps
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total)
    ticks = []
    for batch in loader:
        batch = {name: tensor.to(ctx.device) for name, tensor in batch.items()}
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync(ctx.device)
        ticks.append(time.perf_counter())
    return seconds_per_timed_steps(ticks, sizes.trainer_warmup_steps)


def run(ctx: Context) -> dict:
    sizes = ctx.sizes
    times = {"trainer": [], "plain": []}
    for _ in range(sizes.trainer_repeats):
        times["trainer"].append(run_trainer(ctx))
        times["plain"].append(run_plain(ctx))
    tokens = sizes.trainer_steps * sizes.trainer_batch * sizes.trainer_seq_len
    speed = {name: tokens / statistics.median(values) for name, values in times.items()}
    ratio = speed["trainer"] / speed["plain"]
    model = sizes.trainer_model
    return {
        "rows": [
            row(
                f"tokens/s through Trainer vs a plain loop (D={model['n_embd']}, L={model['n_layer']}, "
                f"M={model['state_size']}, B={sizes.trainer_batch}, T={sizes.trainer_seq_len})",
                f"{speed['trainer']:,.0f}",
                f"{speed['plain']:,.0f}",
                f"{ratio:.2f}x",
                goal=">= 0.90x",
                met=ratio >= 0.90,
            )
        ],
        "data": {"tokens_per_s": speed, "ratio": ratio, "seconds": times},
    }
