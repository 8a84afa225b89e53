"""`gptb train`: train GPTB (+ ART memory) with Accelerate, from the embedded corpus or your own text.

Runs as one process, or several under `accelerate launch` / `torchrun` (the ART memory stays identical on every rank).
Checkpoints (weights, optimizer, scheduler, RNG, ART memory) go to `OUTPUT_DIR/checkpoints/step-N` and `--resume`
continues from the latest one. At the end `OUTPUT_DIR` holds a Hub-ready model folder, `training_curves.png` and
`metrics.json`; a previous good model there is replaced only after the new one is complete.

    gptb train --preset gptb-tiny --output_dir gptb-tiny-out
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m modeling_gptb.train --preset gptb-tiny
"""

import argparse
import errno
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, broadcast_object_list, set_seed
from accelerate.utils.other import id_tensor_storage
from accelerate.utils.other import load as accelerate_load
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, get_cosine_schedule_with_warmup

from gptb_cli.train_args import TrainArgs, build_parser  # torch-free: `gptb train --help` is quick

from . import data as gptb_data
from .art_memory import ART_MEMORY_FILE
from .configuration_gptb import GPTBConfig
from .modeling_gptb import GPTBLMHeadModel
from .output_folder import (
    CHECKPOINTS,
    INCOMING,
    STATE_FILE,
    FolderInUse,
    FolderLock,
    checkpoints_in,
    complete_swap,
    crash_point,
    discard,
    looks_like_model,
    publish_checkpoint,
    publish_model,
    read_checkpoint_state,
    remove_leftovers,
    run_differences,
    run_id,
    staging_folder,
)
from .presets import load_model_preset, load_recipe
from .throughput import model_flops_utilization, peak_flops
from .tokenization import token_config_kwargs, train_tokenizer


class TrainingError(RuntimeError):
    """A problem the user can act on; the CLI prints it and exits non-zero."""


# ---------------------------------------------------------------------------------------------------------------------
# Setup: arguments and output folder (checked before any work), tokenizer, data, model

POSITIVE_INTS = (
    "block_size",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "eval_steps",
    "eval_batches",
    "save_steps",
    "logging_steps",
)
OPTIONAL_POSITIVE_INTS = ("max_chars", "num_threads", "stop_after_step")
NON_NEGATIVE_INTS = ("warmup_steps", "sample_tokens")
MIN_TOKENIZER_VOCAB = 258  # 256 bytes + 2 special tokens
TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")  # token_config_kwargs' fields
CONFIG_FIELDS = sorted(set(inspect.signature(GPTBConfig.__init__).parameters) - {"self", "kwargs"})


def check_args(args: TrainArgs):
    """Refuse, in one line naming the argument and its accepted range, any setting out of range."""

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def refuse(name: str, expected: str):
        raise TrainingError(f"--{name} must be {expected}, got {getattr(args, name)!r}")

    for name in POSITIVE_INTS:
        if not is_int(getattr(args, name)) or getattr(args, name) < 1:
            refuse(name, "an integer >= 1")
    for name in OPTIONAL_POSITIVE_INTS:
        value = getattr(args, name)
        if value is not None and (not is_int(value) or value < 1):
            refuse(name, "an integer >= 1")
    for name in NON_NEGATIVE_INTS:
        if not is_int(getattr(args, name)) or getattr(args, name) < 0:
            refuse(name, "an integer >= 0")
    vocab = args.tokenizer_vocab_size
    if vocab is not None and (not is_int(vocab) or vocab < MIN_TOKENIZER_VOCAB):
        refuse("tokenizer_vocab_size", f"an integer >= {MIN_TOKENIZER_VOCAB} (256 bytes + 2 special tokens)")
    for name, floor in (("learning_rate", "> 0"), ("max_grad_norm", "> 0"), ("weight_decay", ">= 0")):
        value = getattr(args, name)
        in_range = isinstance(value, (int, float)) and (value > 0 if floor == "> 0" else value >= 0)
        if not in_range or not math.isfinite(value):  # inf passes `> 0` and trains a non-finite model
            refuse(name, f"a finite number {floor}")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        refuse("peak_tflops", "a finite number > 0")
    from_tokenizer = sorted(set(args.overrides) & set(TOKENIZER_FIELDS))
    if from_tokenizer:  # the run sets them from the tokenizer; a --set would be silently replaced
        raise TrainingError(
            f"--set {', '.join(from_tokenizer)}: the run takes these from the tokenizer; choose the vocabulary with "
            "--tokenizer_vocab_size N (a tokenizer trained on the data) or --tokenizer"
        )
    unknown = sorted(set(args.overrides) - set(CONFIG_FIELDS))
    if unknown:
        known = ", ".join(CONFIG_FIELDS)
        raise TrainingError(f"--set: unknown model config field(s) {', '.join(unknown)}; known: {known}")
    for option in ("tokenizer", "init_from"):
        check_source(option, getattr(args, option))


def check_source(option: str, value: str | None):
    """A local folder, or a Hub repo id (loaded, and its errors reported, when the run starts)."""
    if value is None or Path(value).expanduser().is_dir():
        return
    if Path(value).expanduser().exists():
        raise TrainingError(f"--{option} {value} is a file; expected a model folder or a Hub repo id")
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise TrainingError(f"--{option} {value}: no such folder, and not a Hub repo id (name or org/name)") from None


def model_fields(args: TrainArgs) -> dict:
    """The model config the run asks for (preset, then --set), its values checked by GPTBConfig."""
    fields = json.loads(json.dumps({**load_model_preset(args.preset), **args.overrides}))  # as a checkpoint records it
    GPTBConfig(**fields)
    return fields


# The settings that decide what a run produces (with the model config and the data); output, logging and
# sampling settings do not.
RUN_SETTINGS = (
    "seed",
    "tokenizer",
    "tokenizer_vocab_size",
    "init_from",
    "block_size",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
)
EVAL_SETTINGS = ("eval_steps", "eval_batches")


def run_record(args: TrainArgs, fields: dict, accelerator: Accelerator) -> dict:
    """What decides a run's result; every checkpoint records it and a resumed run must match it."""
    names = RUN_SETTINGS + (EVAL_SETTINGS if fields.get("art_learn_in_eval") else ())  # eval then trains the memory
    settings = {name: getattr(args, name) for name in names}
    settings["mixed_precision"] = accelerator.mixed_precision  # what ran, whether set here or by `accelerate launch`
    settings["num_processes"] = accelerator.num_processes
    return {"settings": settings, "model": fields}


def check_output_dir(args: TrainArgs, output: Path):
    """Refuse a run that could overwrite a good model or mix with an earlier run's checkpoints."""
    if args.resume or args.overwrite_output_dir:
        return
    if looks_like_model(output):
        raise TrainingError(
            f"--output_dir {output} already holds a trained model. Pass --resume to continue its training, "
            "--overwrite_output_dir to replace it when the new run succeeds, or choose another folder."
        )
    found = checkpoints_in(output)
    if found:
        raise TrainingError(
            f"--output_dir {output} holds checkpoints of an earlier run ({', '.join(p.name for p in found)}). "
            "Pass --resume to continue it, --overwrite_output_dir to discard them, or choose another folder."
        )


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
        return load_source("tokenizer" if args.tokenizer else "init_from", source, AutoTokenizer.from_pretrained)
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
        return load_source("init_from", args.init_from, lambda source: GPTBLMHeadModel.from_pretrained(source, **own))
    return GPTBLMHeadModel(GPTBConfig(**fields))


def load_source(option: str, source: str, load):
    """A tokenizer or model from a folder or the Hub, or one line saying why not."""
    try:
        return load(source)
    except OSError as error:  # missing files, unknown repo, no network
        raise TrainingError(f"--{option} {source} could not be loaded: {one_line(error)}") from error


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a hidden folder and renamed, so a crash never leaves a half checkpoint (output_folder.py)


def resolve_resume(args: TrainArgs, output: Path) -> Path | None:
    if not args.resume:
        return None
    if args.resume != "latest":
        folder = Path(args.resume)
        if not (folder / STATE_FILE).is_file():
            raise TrainingError(
                f"--resume {folder} is not a GPTB training checkpoint (no {STATE_FILE}); "
                f"checkpoints live in {output / CHECKPOINTS}/step-N, or pass --resume latest"
            )
        return folder
    found = checkpoints_in(output)
    if not found:
        raise TrainingError(f"--resume latest: no checkpoint under {output / CHECKPOINTS}")
    return found[-1]


def one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def check_resume(args: TrainArgs, output: Path, checkpoint: Path, record: dict, process_index: int) -> dict:
    """The checkpoint's state, if it belongs to this run and can be continued exactly."""
    try:
        saved = read_checkpoint_state(checkpoint)
    except (OSError, ValueError) as error:
        raise TrainingError(f"checkpoint {checkpoint} is damaged: {STATE_FILE}: {one_line(error)}") from error
    if "run" not in saved:
        raise TrainingError(
            f"checkpoint {checkpoint} does not record its run's settings (an older gptb wrote it), so it cannot be "
            "checked to belong to this run; start a new run"
        )
    differences = run_differences(saved["run"], record, sections=("settings", "model"))
    if differences:
        listed = "; ".join(differences)
        extend = f" (to train a finished run further: --init_from {output})" if "--max_steps" in listed else ""
        raise TrainingError(
            f"--resume: this run's settings differ from those of the run in {checkpoint}: {listed}. "
            f"Resume with the checkpoint's settings, or start a new run in another --output_dir{extend}."
        )
    foreign = [p.name for p in checkpoints_in(output) if read_checkpoint_state(p).get("run_id") != saved.get("run_id")]
    if foreign:
        raise TrainingError(
            f"--output_dir {output} also holds checkpoints of another run ({', '.join(foreign)}); "
            "move or delete them before resuming"
        )
    check_random_states(args, checkpoint, process_index)
    return saved


RANDOM_STATES = ("random_state", "numpy_random_seed", "torch_manual_seed")  # keys of accelerate's RNG file


def check_random_states(args: TrainArgs, checkpoint: Path, process_index: int):
    """accelerate skips a missing or unreadable RNG file silently; without it a resumed run draws other dropout."""
    path = checkpoint / f"random_states_{process_index}.pkl"
    expected = RANDOM_STATES + (("torch_cuda_manual_seed",) if torch.cuda.is_available() else ())
    problem = None
    if not path.is_file():
        problem = "is missing"
    else:
        try:
            missing = [key for key in expected if key not in accelerate_load(path)]
            problem = f"lacks {', '.join(missing)}" if missing else None
        except Exception as error:  # pickle, zip and weights-only errors alike
            problem = f"is unreadable ({one_line(error)})"
    if problem and not args.allow_inexact_resume:
        raise TrainingError(
            f"checkpoint {checkpoint}: {path.name} (the random-number states) {problem}, so the resumed run would not "
            "repeat the interrupted one; pass --allow_inexact_resume to continue anyway"
        )
    if problem:
        print(f"Warning: {path} {problem}; resuming without the exact random-number states", file=sys.stderr)


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_SPACE_WORDS = (
    "No space left",
    "Disk quota exceeded",
    "File too large",
    "os error 28",
    "os error 122",
    "os error 27",
)
LOW_DISK_BYTES = 16 * 2**20  # torch's writer drops the errno ("unexpected pos"): then a disk this full is the cause


def out_of_space(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
        return True
    if any(words in str(error) for words in NO_SPACE_WORDS):  # safetensors' and torch's errors carry them as text
        return True
    try:
        return shutil.disk_usage(folder).free < LOW_DISK_BYTES
    except OSError:
        return False


@contextmanager
def writing(staging: Path, what: str):
    """Write `what` into `staging`: on a full disk, remove the partial folder and stop with one line (exit 2); the
    folder's last complete checkpoint stays, so the run continues with --resume once there is room."""
    try:
        yield
    except Exception as error:
        if not out_of_space(error, staging.parent):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        folder, disk = staging.parent, staging.parent.resolve()
        while not disk.is_mount():
            disk = disk.parent
        free = shutil.disk_usage(folder).free
        raise TrainingError(
            f"no space left on the disk mounted at {disk} ({free:,} bytes free, or a quota or file-size limit was "
            f"reached) while writing {what} in {folder}: {one_line(error)}. Free some space, then continue with "
            "--resume"
        ) from error


def save_checkpoint(accelerator: Accelerator, output: Path, step: int, history: dict, record: dict, keep: int = 2):
    final = output / CHECKPOINTS / f"step-{step}"
    staging = staging_folder(final)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    with writing(staging, f"checkpoint step-{step}"):
        accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every rank's RNG file is written before the main process moves the folder
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(accelerator._models[0])
        with writing(staging, f"checkpoint step-{step}"):
            if model.art_memory is not None:
                model.art_memory.save_pretrained(staging)
            state = {"step": step, "history": history, "run": record, "run_id": run_id(record)}
            (staging / STATE_FILE).write_text(json.dumps(state))
        publish_checkpoint(staging, final, keep)
    accelerator.wait_for_everyone()


def drop_shared_tensors(models, weights, output_dir):
    """Save one name per storage (the tied lm_head is wte), as accelerate would, without its warning each time."""
    for state in weights:
        seen = set()
        for name in list(state):
            storage = id_tensor_storage(state[name])
            if storage in seen:
                del state[name]
            seen.add(storage)


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


def check_fsdp_honoured(accelerator: Accelerator):
    """A launch configured for FSDP must run FSDP: Accelerate 1.15 turns it on only on GPUs (and the like) and on the
    CPU (ACCELERATE_USE_CPU=1) silently runs DDP instead."""
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP:
        raise ValueError(
            f"the launch asks for FSDP, but Accelerate runs {accelerator.distributed_type.value} here (it has no "
            "FSDP on the CPU): launch without FSDP (configuration/accelerate/cpu-2proc.yaml runs DDP) or on GPUs"
        )


def open_output_dir(args: TrainArgs, output: Path, record: dict, accelerator: Accelerator):
    """Finish a final swap that a killed run left half done, then check that the folder suits this run: the
    checkpoint to resume from and its saved state, or (None, None) for a fresh run."""
    if accelerator.is_main_process and output.is_dir() and complete_swap(output):
        print(f"Moved in the finished model that a killed run left in {output / INCOMING}")
    accelerator.wait_for_everyone()
    check_output_dir(args, output)
    resume_from = resolve_resume(args, output)
    if resume_from is None:
        return None, None
    return resume_from, check_resume(args, output, resume_from, record, accelerator.process_index)


def is_published(output: Path, record: dict) -> bool:
    """Whether `output` holds the final model of this very run."""
    metrics = output / "metrics.json"
    return (
        looks_like_model(output)
        and metrics.is_file()
        and json.loads(metrics.read_text()).get("run_id") == run_id(record)
    )


def train(args: TrainArgs) -> dict:
    check_args(args)
    fields = model_fields(args)
    output = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_dir=str(output),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_fsdp_honoured(accelerator)
    lock = lock_output_dir(output, accelerator)
    try:
        return run_training(args, fields, output, accelerator)
    finally:
        if lock is not None:
            lock.release()


def lock_output_dir(output: Path, accelerator: Accelerator) -> FolderLock | None:
    """The main process locks `output` for the whole run (two runs in one folder would mix their files); every rank
    stops with the same error if another run holds it."""
    if output.exists() and not output.is_dir():
        raise TrainingError(f"--output_dir {output} exists and is not a folder")
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = FolderLock(output).acquire()
        except FolderInUse as error:
            problem = f"--output_dir {error}; wait for it to end or choose another folder"
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem:
        if lock is not None:
            lock.release()
        raise TrainingError(problem)
    return lock


def run_training(args: TrainArgs, fields: dict, output: Path, accelerator: Accelerator) -> dict:
    record = run_record(args, fields, accelerator)
    resume_from, saved = open_output_dir(args, output, record, accelerator)
    set_seed(args.seed)
    peak = peak_flops(accelerator.device, args.peak_tflops)  # for MFU in the log; checks --peak_tflops
    log = accelerator.print
    if args.warmup_steps > args.max_steps:  # a recipe's warmup with a short --max_steps: say what the schedule does
        log(
            f"Warning: --warmup_steps {args.warmup_steps} exceeds --max_steps {args.max_steps}: the learning rate "
            f"rises for the whole run and ends at {args.learning_rate * args.max_steps / args.warmup_steps:.3g}, "
            f"never reaching --learning_rate {args.learning_rate:g}"
        )

    train_texts, eval_texts, data_source = load_texts(args)
    record["data"] = {"sha256": texts_digest(train_texts + eval_texts)}
    if saved is not None:
        differences = run_differences(saved["run"], record, sections=("data",))
        if differences:
            raise TrainingError(
                f"--resume: the texts of {data_source} differ from those the run in {resume_from} trained on: "
                f"{differences[0]}. Resume with the same data, or start a new run in another --output_dir."
            )
        if saved["step"] >= args.max_steps and is_published(output, record):
            log(
                f"The run in {output} is complete (step {saved['step']} of --max_steps {args.max_steps}); nothing to "
                f"do. To train further, start a new run from its model: gptb train --init_from {output} "
                "--output_dir NEW_FOLDER --max_steps N"
            )
            end_distributed(accelerator)
            return {"step": saved["step"], "history": saved["history"], "complete": True}
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        remove_leftovers(output)
        if resume_from is None:  # an earlier run's checkpoints, kept only as long as --overwrite_output_dir allowed
            for old in checkpoints_in(output):
                discard(old)
    accelerator.wait_for_everyone()
    model_preset = load_model_preset(args.preset)
    tokenizer = build_tokenizer(args, train_texts, model_preset, accelerator, output, resume_from is not None)
    train_set = gptb_data.TokenBlockDataset.from_texts(train_texts, tokenizer, args.block_size)
    try:
        eval_set = gptb_data.TokenBlockDataset.from_texts(eval_texts, tokenizer, args.block_size)
    except ValueError as err:
        held_out = gptb_data.HOLD_OUT_RULE if args.data else "its validation split"
        raise ValueError(f"the held-out text of {data_source} ({held_out}) is too short: {err}") from None
    model = build_model(args, model_preset, tokenizer)
    if args.compile:
        model.transformer.compile_step()
    recompute = ""
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
        recompute = f"; activation checkpointing every {model.config.checkpoint_every_steps or 1} step(s)"
    if accelerator.device.type == "cpu":
        # A small model's step is many tiny ops: thread-pool hand-offs cost more than they save (3x on gptb-tiny).
        torch.set_num_threads(args.num_threads or (1 if model.config.n_embd < 512 else torch.get_num_threads()))
    log(
        f"GPTB {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, state {model.config.state_size} "
        f"x {model.config.n_embd}; {len(train_set)} training blocks of {args.block_size} tokens from {data_source}; "
        f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}, "
        f"{torch.get_num_threads()} CPU thread(s) each{recompute}"
    )

    # Each loader draws its per-iterator seed from its own generator, so the global one feeds dropout alone: a resumed
    # run, which opens its loader at another step, then draws the same dropout masks as an uninterrupted one.
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    eval_loader = torch.utils.data.DataLoader(
        eval_set, batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed)
    )
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
    accelerator.register_save_state_pre_hook(drop_shared_tensors)
    if args.report_to:
        accelerator.init_trackers("gptb", config={k: v for k, v in asdict(args).items() if k != "overrides"})

    step, history = 0, {"step": [], "loss": [], "eval_step": [], "eval_loss": [], "art_categories": []}
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
            memory = accelerator.unwrap_model(model).art_memory
            if memory is not None:  # the state_dict leaves out what only the ART file holds (calibration, exemplars)
                memory.load_file(resume_from / ART_MEMORY_FILE)
            step, history = int(saved["step"]), saved["history"]
        except Exception as error:  # safetensors, torch.load, json and shape errors alike
            raise TrainingError(
                f"checkpoint {resume_from} is damaged or does not fit this model: {one_line(error)}"
            ) from error
        log(f"Resumed from {resume_from} at step {step}")

    model.train()
    progress = tqdm(total=args.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    model_config = accelerator.unwrap_model(model).config
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
                mfu, shown = model_flops_utilization(model_config, stats["tokens_per_s"], peak), {}
                if mfu is not None:
                    stats["mfu"], shown["mfu"] = mfu, f"{mfu:.1%}"
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{stats['tokens_per_s']:.0f}", art=categories, **shown)
                accelerator.log(stats, step=step)
                window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
            if step % args.eval_steps == 0 or step == args.max_steps:
                metrics = evaluate(model, eval_loader, accelerator, args.eval_batches)
                history["eval_step"].append(step)
                history["eval_loss"].append(metrics["eval_loss"])
                accelerator.log(metrics, step=step)
                if accelerator.is_main_process:
                    progress.write(
                        f"step {step}: eval loss {metrics['eval_loss']:.4f}, ppl {metrics['eval_perplexity']:.2f}"
                    )
            if step % args.save_steps == 0 or step == args.max_steps:
                save_checkpoint(accelerator, output, step, history, record)
            if step >= args.max_steps or step == args.stop_after_step:
                break
        if step == args.stop_after_step:
            break
    progress.close()
    check_art_synchronised(accelerator, accelerator.unwrap_model(model))
    if step < args.max_steps:  # stopped early on purpose: leave a checkpoint to resume from, and no final model
        if step % args.save_steps:
            save_checkpoint(accelerator, output, step, history, record)
        accelerator.print(f"Stopped after step {step} of {args.max_steps}; continue with --resume")
        end_distributed(accelerator)
        return {"step": step, "history": history}

    metrics = evaluate(model, eval_loader, accelerator, args.eval_batches)
    result = {"step": step, "data": data_source, "history": history, **metrics, "run_id": run_id(record)}
    is_main = accelerator.is_main_process
    final_model = accelerator.unwrap_model(model)
    # End the process group first: the main process then writes the final folder alone, so nothing it calls can
    # meet another rank's collective.
    end_distributed(accelerator)
    if is_main:
        finish(final_model, tokenizer, args, output, result, eval_texts)
    return result


def end_distributed(accelerator: Accelerator):
    """Wait for every rank, then end the process group without deadlocking in torch's gloo teardown.

    After a collective, a gloo worker thread frees the finished work, whose tensors need the GIL; a process group
    destroyed in that instant (by `destroy_process_group`, or when the DDP wrapper holding it is freed as `train`
    returns) joins that thread while holding the GIL, and both wait forever. Seen once in 11 two-process CPU
    runs under load and once in CI (stacks: `~ProcessGroupGloo` -> `thread::join`, `~AsyncBarrierWork` -> `take_gil`).
    Sleeping releases the GIL, so the worker finishes first.
    """
    accelerator.wait_for_everyone()
    time.sleep(0.2)
    accelerator.end_training()


# ---------------------------------------------------------------------------------------------------------------------
# The end of a run: report, sample, Hub-ready folder, plot


def saved_generation_config(tokenizer) -> GenerationConfig:
    """The `generation_config.json` of a trained model: its special tokens only. A saved length (`max_new_tokens`)
    would beat a caller's `max_length`, and saved sampling settings would make a plain `generate()` or `pipeline`
    sample where users expect transformers' defaults (greedy, `max_length=20`; the pipeline's own)."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def finish(model, tokenizer, args: TrainArgs, output: Path, result: dict, eval_texts: list[str]):
    from .art_report import art_report, format_art_report

    model.eval()
    print(f"\nEval loss {result['eval_loss']:.4f} nats/token, perplexity {result['eval_perplexity']:.2f}")
    if model.art_memory is None:  # art_enabled=false: a plain recurrent LM, nothing to report
        report = {}
        print("The model has no ART memory (config.art_enabled is false)")
    else:
        report = art_report(model, tokenizer, eval_texts[:8])
        scored = f"{len(report['texts'])} held-out evaluation texts (their first 60 characters)"
        print(format_art_report(report, texts=scored))
    if args.sample_tokens:  # 0: no sample
        torch.manual_seed(args.seed)
        prompt = tokenizer(args.sample_prompt, return_tensors="pt")
        sample = model.generate(
            **prompt, max_new_tokens=args.sample_tokens, do_sample=True, top_k=40, pad_token_id=tokenizer.pad_token_id
        )
        result["sample"] = tokenizer.decode(sample[0], skip_special_tokens=True)
        print(f"\nSample: {result['sample']!r}\n")

    model.generation_config = saved_generation_config(tokenizer)
    staging = output / INCOMING
    if staging.exists():
        shutil.rmtree(staging)
    with writing(staging, "the final model"):
        write_model_folder(model, tokenizer, args, result, report, staging)
    crash_point("final-write")
    publish_model(staging, output)
    print(f"Saved a Hub-ready model to {output} (plot: {output / 'training_curves.png'})")


def write_model_folder(model, tokenizer, args: TrainArgs, result: dict, report: dict, staging: Path):
    """The complete Hub-ready folder, written to `staging` (`.incoming`)."""
    from .model_card import render_model_card
    from .plots import plot_training

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


# ---------------------------------------------------------------------------------------------------------------------
# Command line


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
    overrides = dict(values.pop("overrides", {}))  # a recipe's model config fields; --set goes on top
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
