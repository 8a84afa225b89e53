"""`gptb train`: train GPTB (+ ART memory) with Accelerate, from the embedded corpus or your own text.

Runs as one process, or several under `accelerate launch` / `torchrun` (the ART memory stays identical on every rank).
Checkpoints (weights, optimizer, scheduler, RNG, ART memory) go to `OUTPUT_DIR/checkpoints/step-N` and `--resume`
continues from the latest one. At the end `OUTPUT_DIR` holds a Hub-ready model folder, `training_curves.png` and
`metrics.json`; a previous good model there is replaced only after the new one is complete.

    gptb train --preset gptb-tiny --output_dir gptb-tiny-out
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m modeling_gptb.train --preset gptb-tiny
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, get_cosine_schedule_with_warmup

from . import data as gptb_data
from .configuration_gptb import GPTBConfig
from .modeling_gptb import GPTBLMHeadModel
from .presets import load_model_preset, load_recipe
from .tokenization import token_config_kwargs, train_tokenizer

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


class TrainingError(RuntimeError):
    """A problem the user can act on; the CLI prints it and exits non-zero."""


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
    overwrite_output_dir: bool = False
    report_to: str | None = None
    sample_prompt: str = "The "
    sample_tokens: int = 80
    overrides: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Setup: output folder, tokenizer, data, model


def looks_like_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def check_output_dir(args: TrainArgs) -> Path:
    """Refuse to start a run that could overwrite a good model, before any work."""
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise TrainingError(f"--output_dir {output} exists and is not a folder")
    if output.is_dir() and looks_like_model(output) and not (args.resume or args.overwrite_output_dir):
        raise TrainingError(
            f"--output_dir {output} already holds a trained model. Pass --resume to continue its training, "
            "--overwrite_output_dir to replace it when the new run succeeds, or choose another folder."
        )
    return output


def load_texts(args: TrainArgs) -> tuple[list[str], list[str], str]:
    """Training and held-out texts, and a description of where they came from."""
    if args.data:
        train, held_out = gptb_data.hold_out(gptb_data.load_text_files(args.data))
        return train, held_out, f"text files under {args.data}"
    if args.dataset:
        train = gptb_data.load_hf_dataset(args.dataset, split="train")
        held_out = gptb_data.load_hf_dataset(args.dataset, split="validation")
        return train, held_out, f"Hugging Face dataset {args.dataset}"
    train = gptb_data.load_corpus(args.corpus, split="train", max_chars=args.max_chars)
    cap = None if args.max_chars is None else max(args.max_chars // 10, 10_000)
    held_out = gptb_data.load_corpus(args.corpus, split="validation", max_chars=cap)
    return train, held_out, f"embedded corpus '{args.corpus}' ({gptb_data.CORPORA[args.corpus].description})"


def build_tokenizer(
    args: TrainArgs, texts: list[str], model_preset: dict, accelerator: Accelerator, output: Path, resuming: bool
):
    """
    The user's tokenizer, the warm-start checkpoint's, or a byte-level BPE trained on the corpus (on rank 0).

    A trained one is kept beside the checkpoints, so a resumed run reads the one its weights were trained with; a
    fresh run retrains it unless it was made from the same texts and vocabulary size (a failed run on other data, or
    a run being replaced, may have left one behind).
    """
    source = args.tokenizer or args.init_from
    if source:
        return AutoTokenizer.from_pretrained(source)
    cached = output / "checkpoints" / "tokenizer"
    vocab_size = args.tokenizer_vocab_size or model_preset.get("vocab_size", 4096)
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (resuming and (cached / "tokenizer.json").is_file()):
            made_from = {"texts_sha256": texts_digest(texts), "vocab_size": vocab_size}
            record = cached / TOKENIZER_SOURCE_FILE
            if not record.is_file() or json.loads(record.read_text()) != made_from:
                train_tokenizer(texts, vocab_size=vocab_size).save_pretrained(cached)
                record.write_text(json.dumps(made_from))
    return AutoTokenizer.from_pretrained(cached)


TOKENIZER_SOURCE_FILE = "gptb_tokenizer_source.json"  # what a kept tokenizer was trained from


def texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")  # document boundaries count
    return digest.hexdigest()


def build_model(args: TrainArgs, model_preset: dict, tokenizer) -> GPTBLMHeadModel:
    fields = {**model_preset, **args.overrides, **token_config_kwargs(tokenizer)}
    if args.init_from:
        own = {key: value for key, value in fields.items() if key not in ("vocab_size",)}
        return GPTBLMHeadModel.from_pretrained(args.init_from, **own)
    return GPTBLMHeadModel(GPTBConfig(**fields))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder and renamed, so a crash never leaves a half checkpoint


def checkpoints_in(output: Path) -> list[Path]:
    folder = output / "checkpoints"
    found = [p for p in folder.glob(CHECKPOINT_PREFIX + "*") if (p / STATE_FILE).is_file() and p.suffix != ".tmp"]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(args: TrainArgs, output: Path) -> Path | None:
    if not args.resume:
        return None
    if args.resume != "latest":
        folder = Path(args.resume)
        if not (folder / STATE_FILE).is_file():
            raise TrainingError(
                f"--resume {folder} is not a GPTB training checkpoint (no {STATE_FILE}); "
                f"checkpoints live in {output / 'checkpoints'}/{CHECKPOINT_PREFIX}N, or pass --resume latest"
            )
        return folder
    found = checkpoints_in(output)
    if not found:
        raise TrainingError(f"--resume latest: no checkpoint under {output / 'checkpoints'}")
    return found[-1]


def save_checkpoint(accelerator: Accelerator, output: Path, step: int, history: dict, keep: int = 2):
    final = output / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    staging = final.with_suffix(".tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(accelerator._models[0])
        if model.art_memory is not None:
            model.art_memory.save_pretrained(staging)
        (staging / STATE_FILE).write_text(json.dumps({"step": step, "history": history}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in checkpoints_in(output)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, max_batches: int) -> dict:
    model.eval()
    total_loss = torch.zeros((), device=accelerator.device)
    total_tokens = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        tokens = batch["input_ids"][:, 1:].numel()
        total_loss += out.loss.float() * tokens
        total_tokens += tokens
    model.train()
    total_loss = accelerator.reduce(total_loss, "sum")
    total_tokens = accelerator.reduce(total_tokens, "sum")
    loss = (total_loss / total_tokens.clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def check_art_synchronised(accelerator: Accelerator, model):
    """Every rank must hold the identical memory (docs/design.md#distributed-art); say so, or stop with an error."""
    memory = getattr(model, "art_memory", None)
    if memory is None or accelerator.num_processes == 1:
        return
    state = memory.state_dict()
    checksum = torch.stack([tensor.double().sum() for tensor in state.values()]).to(accelerator.device)
    checksums = accelerator.gather(checksum[None])
    if not bool((checksums == checksums[0]).all()):
        raise TrainingError(f"ART memories differ across ranks (checksums {checksums.tolist()})")
    ranks, categories = accelerator.num_processes, memory.num_categories
    accelerator.print(f"ART memory identical on all {ranks} ranks ({categories} categories)")


def art_categories(model) -> int:
    memory = getattr(model, "art_memory", None)
    return memory.num_categories if memory is not None else 0


def train(args: TrainArgs) -> dict:
    output = check_output_dir(args)
    resume_from = resolve_resume(args, output)
    model_preset = load_model_preset(args.preset)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_dir=str(output),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    log = accelerator.print
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)

    train_texts, eval_texts, data_source = load_texts(args)
    tokenizer = build_tokenizer(args, train_texts, model_preset, accelerator, output, resume_from is not None)
    train_set = gptb_data.TokenBlockDataset.from_texts(train_texts, tokenizer, args.block_size)
    try:
        eval_set = gptb_data.TokenBlockDataset.from_texts(eval_texts, tokenizer, args.block_size)
    except ValueError as err:
        held_out = gptb_data.HOLD_OUT_RULE if args.data else "its validation split"
        raise ValueError(f"the held-out text of {data_source} ({held_out}) is too short: {err}") from None
    model = build_model(args, model_preset, tokenizer)
    if accelerator.device.type == "cpu":
        # A small model's step is many tiny ops: thread-pool hand-offs cost more than they save (3x on gptb-tiny).
        torch.set_num_threads(args.num_threads or (1 if model.config.n_embd < 512 else torch.get_num_threads()))
    log(
        f"GPTB {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, state {model.config.state_size} "
        f"x {model.config.n_embd}; {len(train_set)} training blocks of {args.block_size} tokens from {data_source}; "
        f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}, "
        f"{torch.get_num_threads()} CPU thread(s) each"
    )

    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=args.batch_size)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "initial_embeds" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "initial_embeds" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.95),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    if args.report_to:
        accelerator.init_trackers("gptb", config={k: v for k, v in asdict(args).items() if k != "overrides"})

    step, history = 0, {"step": [], "loss": [], "eval_step": [], "eval_loss": [], "art_categories": []}
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
            saved = json.loads((resume_from / STATE_FILE).read_text())
            step, history = int(saved["step"]), saved["history"]
        except Exception as error:  # safetensors, torch.load, json and shape errors alike
            raise TrainingError(
                f"checkpoint {resume_from} is damaged or does not fit this model: {type(error).__name__}: {error}"
            ) from error
        log(f"Resumed from {resume_from} at step {step}")

    model.train()
    progress = tqdm(total=args.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    tokens_per_step = args.batch_size * args.block_size * args.gradient_accumulation_steps * accelerator.num_processes
    window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
    batches_per_epoch = len(train_loader)
    # Seeded sampler + skipping the batches already seen: a resumed run sees the same batches as an uninterrupted one.
    epoch, skip = divmod(step * args.gradient_accumulation_steps, max(batches_per_epoch, 1))
    while step < args.max_steps:
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        epoch, skip = epoch + 1, 0
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window_loss += out.loss.detach().float().item() / args.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            step += 1
            window_steps += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == args.max_steps:
                elapsed = time.perf_counter() - window_start
                loss = window_loss / window_steps
                categories = art_categories(accelerator.unwrap_model(model))
                history["step"].append(step)
                history["loss"].append(loss)
                history["art_categories"].append(categories)
                stats = {"loss": loss, "tokens_per_s": tokens_per_step * window_steps / elapsed}
                stats["art_categories"] = categories
                stats["lr"] = scheduler.get_last_lr()[0]
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{stats['tokens_per_s']:.0f}", art=categories)
                accelerator.log(stats, step=step)
                window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
            if step % args.eval_steps == 0 or step == args.max_steps:
                metrics = evaluate(model, eval_loader, accelerator, args.eval_batches)
                history["eval_step"].append(step)
                history["eval_loss"].append(metrics["eval_loss"])
                accelerator.log(metrics, step=step)
                progress.write(
                    f"step {step}: eval loss {metrics['eval_loss']:.4f}, ppl {metrics['eval_perplexity']:.2f}"
                )
            if step % args.save_steps == 0 or step == args.max_steps:
                save_checkpoint(accelerator, output, step, history)
            if step >= args.max_steps or step == args.stop_after_step:
                break
        if step == args.stop_after_step:
            break
    progress.close()
    check_art_synchronised(accelerator, accelerator.unwrap_model(model))
    if step < args.max_steps:  # stopped early on purpose: leave a checkpoint to resume from, and no final model
        if step % args.save_steps:
            save_checkpoint(accelerator, output, step, history)
        accelerator.print(f"Stopped after step {step} of {args.max_steps}; continue with --resume")
        accelerator.end_training()
        return {"step": step, "history": history}

    metrics = evaluate(model, eval_loader, accelerator, args.eval_batches)
    result = {"step": step, "data": data_source, "history": history, **metrics}
    is_main = accelerator.is_main_process
    final_model = accelerator.unwrap_model(model)
    # End the process group first: the main process then writes the final folder alone, so nothing it calls can
    # meet another rank's collective.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if is_main:
        finish(final_model, tokenizer, args, output, result, eval_texts)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The end of a run: report, sample, Hub-ready folder, plot


def finish(model, tokenizer, args: TrainArgs, output: Path, result: dict, eval_texts: list[str]):
    from .art_report import art_report, format_art_report
    from .model_card import render_model_card
    from .plots import plot_training

    model.eval()
    print(f"\nEval loss {result['eval_loss']:.4f} nats/token, perplexity {result['eval_perplexity']:.2f}")
    report = art_report(model, tokenizer, eval_texts[:8])
    print(format_art_report(report))
    torch.manual_seed(args.seed)
    prompt = tokenizer(args.sample_prompt, return_tensors="pt")
    sample = model.generate(
        **prompt, max_new_tokens=args.sample_tokens, do_sample=True, top_k=40, pad_token_id=tokenizer.pad_token_id
    )
    result["sample"] = tokenizer.decode(sample[0], skip_special_tokens=True)
    print(f"\nSample: {result['sample']!r}\n")

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        top_k=40,
        max_new_tokens=100,
    )
    staging = output / ".incoming"
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    card = render_model_card(
        model,
        datasets=[args.dataset] if args.dataset else None,  # Hub dataset ids only; local text is described below
        training={
            "steps": result["step"],
            "tokens": result["step"] * args.batch_size * args.block_size * args.gradient_accumulation_steps,
            "eval_loss": round(result["eval_loss"], 4),
            "eval_perplexity": round(result["eval_perplexity"], 2),
            "data": result["data"],
        },
        art_report={key: report[key] for key in ("num_categories", "rule", "vigilance") if key in report},
        base_model=args.init_from,
    )
    card.save(staging / "README.md")
    (staging / "metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    plot_training(result["history"], staging / "training_curves.png")
    for item in staging.iterdir():  # swap in, file by file, only now that everything is written
        target = output / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    print(f"Saved a Hub-ready model to {output} (plot: {output / 'training_curves.png'})")


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="gptb train", description=__doc__.split("\n\n")[0])
    # No defaults here but the recipe's: a value given on the command line overrides the recipe, nothing else does.
    defaults = TrainArgs()
    parser.add_argument("--preset", help=f"model preset name or .json path (default {defaults.preset})")
    parser.add_argument("--recipe", default=defaults.recipe, help="training recipe name or .json path ('none' = off)")
    parser.add_argument("--output_dir", help=f"default {defaults.output_dir}")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--corpus", help=f"embedded corpus (see `gptb corpora`; default {defaults.corpus})")
    source.add_argument("--data", help="a text file or a folder of .txt/.md/.rst/.py files")
    source.add_argument("--dataset", help="a Hugging Face dataset name (needs `datasets` and network)")
    parser.add_argument("--max_chars", type=int, help="cap on corpus characters")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: train one on the data)")
    parser.add_argument("--tokenizer_vocab_size", type=int)
    parser.add_argument("--init_from", help="warm-start from a GPT-2 or GPTB checkpoint (folder or Hub id)")
    for name in (
        "block_size",
        "batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "warmup_steps",
        "eval_steps",
        "eval_batches",
        "save_steps",
        "logging_steps",
        "seed",
        "sample_tokens",
        "num_threads",
    ):
        parser.add_argument(f"--{name}", type=int)
    for name in ("learning_rate", "weight_decay", "max_grad_norm"):
        parser.add_argument(f"--{name}", type=float)
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"])
    parser.add_argument(
        "--resume", nargs="?", const="latest", help="continue from the latest (or the given) checkpoint"
    )
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--stop_after_step", type=int, help="stop (as if interrupted) after this step of the schedule")
    parser.add_argument("--report_to", choices=["tensorboard", "wandb", "none"])
    parser.add_argument("--sample_prompt")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field (JSON value)"
    )
    return parser


def args_from_namespace(namespace: argparse.Namespace) -> TrainArgs:
    """Recipe values first, then explicit command-line values on top."""
    values = {}
    if namespace.recipe and namespace.recipe != "none":
        values.update(load_recipe(namespace.recipe))
    for key, value in vars(namespace).items():
        if key in ("set", "recipe") or value is None:
            continue
        values[key] = value
    if values.get("report_to") == "none":
        values["report_to"] = None
    if namespace.data or namespace.dataset:
        values.pop("corpus", None)
    overrides = {}
    for item in namespace.set:
        name, sep, raw = item.partition("=")
        if not sep:
            raise TrainingError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[name] = raw
    known = {f for f in TrainArgs.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainingError(f"unknown training setting(s) {unknown} in the recipe; known: {sorted(known)}")
    return TrainArgs(**values, overrides=overrides, recipe=namespace.recipe)


def main(argv=None) -> int:
    namespace = build_parser().parse_args(argv)
    try:
        train(args_from_namespace(namespace))
    except (TrainingError, ValueError, FileNotFoundError) as error:
        print(f"gptb train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
