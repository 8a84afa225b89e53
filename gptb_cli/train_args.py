"""The settings of `gptb train` and their command line, without torch or transformers: `gptb train --help` and an
argument error answer at once. The training itself is `modeling_gptb/train.py`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

DESCRIPTION = "`gptb train`: train GPTB (+ ART memory) with Accelerate, from the embedded corpus or your own text."


@dataclass
class TrainArgs:
    preset: str = "gptb-tiny"
    recipe: str | None = "tiny-cpu"
    output_dir: str = "gptb-out"
    corpus: str = "stdlib-docs"
    data: str | None = None
    dataset: str | None = None
    max_chars: int | None = 1_500_000
    tokenizer: str | None = None
    tokenizer_vocab_size: int | None = None
    init_from: str | None = None
    block_size: int = 64
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    eval_steps: int = 100
    eval_batches: int = 20
    save_steps: int = 100
    logging_steps: int = 10
    seed: int = 0
    resume: str | None = None
    stop_after_step: int | None = None
    num_threads: int | None = None
    compile: bool = False  # torch.compile each step's window (GPUs; see GPTBModel.compile_step)
    activation_checkpointing: bool = False  # recompute the steps in backward; spans of config.checkpoint_every_steps
    peak_tflops: float | None = None  # the peak MFU is measured against (default: a table of GPUs)
    overwrite_output_dir: bool = False
    allow_inexact_resume: bool = False
    report_to: str | None = None
    sample_prompt: str = "The "
    sample_tokens: int = 80
    overrides: dict = field(default_factory=dict)


# Numeric settings: (type, what it is). Their default is the recipe's value, else TrainArgs'.
_NUMBERS = {
    "max_chars": (int, "cap on the corpus characters read for training"),
    "tokenizer_vocab_size": (int, "vocabulary of the BPE trained on the data (>= 258)"),
    "block_size": (int, "tokens per training sequence"),
    "batch_size": (int, "sequences per batch and process"),
    "gradient_accumulation_steps": (int, "batches summed into one optimizer step"),
    "max_steps": (int, "optimizer steps in all"),
    "warmup_steps": (int, "linear learning-rate warm-up steps before the cosine decay"),
    "eval_steps": (int, "evaluate every this many steps"),
    "eval_batches": (int, "held-out batches per evaluation"),
    "save_steps": (int, "write a checkpoint every this many steps"),
    "logging_steps": (int, "log the training loss every this many steps"),
    "seed": (int, "random seed of the run (weights, data order, dropout)"),
    "sample_tokens": (int, "tokens of the sample printed at the end (0: no sample)"),
    "num_threads": (int, "torch CPU threads per process (default: 1 for models narrower than 512, else torch's)"),
    "learning_rate": (float, "peak learning rate (AdamW)"),
    "weight_decay": (float, "AdamW weight decay"),
    "max_grad_norm": (float, "gradient clipping norm"),
}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="gptb train", description=DESCRIPTION)
    # No defaults here but the recipe's: a value given on the command line overrides the recipe, nothing else does.
    defaults = TrainArgs()

    def default(name: str) -> str:
        value = getattr(defaults, name)
        shown = repr(value) if isinstance(value, str) else value
        return f" (default: the recipe's, else {shown})" if value is not None else " (default: the recipe's)"

    parser.add_argument("--preset", help=f"model preset name or .json path (default {defaults.preset})")
    parser.add_argument("--recipe", default=defaults.recipe, help="training recipe name or .json path ('none' = off)")
    parser.add_argument(
        "--output_dir", help=f"where the model, checkpoints and plots go (default {defaults.output_dir})"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--corpus", help=f"embedded corpus (see `gptb corpora`; default {defaults.corpus})")
    source.add_argument("--data", help="a text file or a folder of .txt/.md/.rst/.py files")
    source.add_argument("--dataset", help="a Hugging Face dataset name (needs `datasets` and network)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: train one on the data)")
    parser.add_argument("--init_from", help="warm-start from a GPT-2 or GPTB checkpoint (folder or Hub id)")
    for name, (kind, text) in _NUMBERS.items():
        parser.add_argument(f"--{name}", type=kind, help=text + default(name))
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "bf16", "fp16"],
        help="mixed-precision training" + default("mixed_precision"),
    )
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile each step's window")
    parser.add_argument(
        "--activation_checkpointing",
        action="store_true",
        default=None,
        help="recompute the steps in the backward pass, --set checkpoint_every_steps=K at a time (less memory)",
    )
    parser.add_argument("--peak_tflops", type=float, help="the peak for MFU in the log (default: known GPUs)")
    parser.add_argument(
        "--resume", nargs="?", const="latest", help="continue from the latest (or the given) checkpoint"
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="start afresh in a folder that holds a model or checkpoints (the old model is replaced only at the end)",
    )
    parser.add_argument(
        "--allow_inexact_resume",
        action="store_true",
        help="resume even when the checkpoint's random-number states are missing or unreadable",
    )
    parser.add_argument("--stop_after_step", type=int, help="stop (as if interrupted) after this step of the schedule")
    parser.add_argument(
        "--report_to", choices=["tensorboard", "wandb", "none"], help="also log to this tracker (default: none)"
    )
    parser.add_argument("--sample_prompt", help="prompt of the sample printed at the end" + default("sample_prompt"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field (JSON value)"
    )
    return parser
