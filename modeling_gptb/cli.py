"""The `gptb` commands: generate, art-report, push, corpora, bench, experiment (`gptb train`: `train.py`). The
parser and the dispatch are in `gptb_cli`, which imports no torch, so `gptb --help` is quick."""

import sys
import warnings
from pathlib import Path

from gptb_cli import build_parser, main  # noqa: F401  (`python -m modeling_gptb.cli`, and callers of cli.main)


class CLIError(RuntimeError):
    """A problem the user can act on: printed as one line, exit status 2."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_folder(folder: str, tokenizer_source: str | None = None):
    """A saved GPTB model and its tokenizer (from the folder, or `tokenizer_source`: a folder or Hub id), or a
    clear error saying what is wrong, raised before anything is loaded."""
    import torch  # noqa: F401  (fail early with torch's own message if it is missing)
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from .art_file import UnpairedARTFileWarning
    from .model_folder import check_model_folder
    from .modeling_gptb import GPTBLMHeadModel

    path = check_model_folder(folder)
    if tokenizer_source is None and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CLIError(
            f"{folder} holds no tokenizer (no tokenizer.json): pass one with --tokenizer FOLDER_OR_HUB_ID, "
            "or save it beside the model with tokenizer.save_pretrained(folder)"
        )
    transformers_logging.disable_progress_bar()  # no "Loading weights" bar on every command
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnpairedARTFileWarning)
            model, info = GPTBLMHeadModel.from_pretrained(path, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or path, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise CLIError(f"could not load the model in {folder}: {error}") from error
    for warning in caught:  # ours as one line; any other as Python shows it
        if issubclass(warning.category, UnpairedARTFileWarning):
            print(f"gptb: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    problems = {kind: sorted(info[kind]) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        details = "; ".join(f"{kind.replace('_', ' ')} {keys[:3]}" for kind, keys in problems.items() if keys)
        raise CLIError(f"the weights in {folder} do not fit its GPTB config: {details}")
    if len(tokenizer) > model.config.vocab_size:
        raise CLIError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model in {folder} knows {model.config.vocab_size:,}"
            f" (config.vocab_size): pass the tokenizer it was trained with"
        )
    return model.eval(), tokenizer


def cmd_generate(args) -> int:
    import random

    import torch
    from transformers import TextStreamer

    model, tokenizer = load_folder(args.folder, args.tokenizer)
    seed = random.SystemRandom().randrange(2**31) if args.seed is None else args.seed
    print(f"gptb generate: seed {seed} (pass --seed {seed} to get this sample again)", file=sys.stderr)
    torch.manual_seed(seed)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    # Sampling settings only when sampling: transformers warns about a top_k or temperature that greedy ignores.
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k}
    if args.greedy:
        sampling = {"do_sample": False}
    model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        **sampling,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
    )
    return 0


def cmd_art_report(args) -> int:
    import torch

    from .art_report import art_report, calibrate_art_memory, fit_art_memory, format_art_report

    texts = list(args.text or [])
    for file in args.file or []:
        if not Path(file).is_file():
            raise CLIError(f"--file {file} is not a file; pass a text file whose text to score")
        texts.append(Path(file).read_text(encoding="utf-8"))
    if args.block_tokens < 2:
        raise CLIError(f"--block-tokens must be at least 2 (a block's loss needs two tokens), got {args.block_tokens}")
    model, tokenizer = load_folder(args.folder, args.tokenizer)
    if model.art_memory is None:
        raise CLIError(f"the model in {args.folder} has no ART memory (config.art_enabled is false)")
    if args.fit_on:
        blocks = _art_blocks(args.fit_on, "train", tokenizer, args.blocks, args.block_tokens)
        outliers = [_art_blocks(s, "train", tokenizer, args.blocks, args.block_tokens) for s in args.outliers or []]
        try:
            fitted = fit_art_memory(
                model,
                blocks,
                input_transform=args.input_transform,
                vigilance=args.vigilance,
                pooling=args.pooling,
                pool_layers=args.pool_layers,
                max_categories=args.max_categories,
                beta=args.beta,
                outlier_ids=torch.cat(outliers) if outliers else None,
            )
        except ValueError as error:
            raise CLIError(f"could not fit the memory: {error}") from error
        print(f"fitted the memory on {fitted['sequences']} blocks of {args.fit_on}: {fitted['categories']} categories")
        if outliers:
            print(
                f"fitted the outlier probe against {fitted['outlier_sequences']} blocks of {', '.join(args.outliers)}"
            )
    elif any(value is not None for value in fitting_options(args)):
        raise CLIError(
            "--input-transform, --pooling, --pool-layers, --vigilance, --beta, --max-categories and --outliers apply "
            "when fitting: pass --fit-on too"
        )
    if args.calibrate_on:
        blocks = _art_blocks(args.calibrate_on, "validation", tokenizer, args.blocks, args.block_tokens)
        try:
            calibrate_art_memory(model, blocks, fpr=args.fpr)
        except ValueError as error:
            raise CLIError(f"could not calibrate: {error}") from error
    if args.save:
        if not (args.fit_on or args.calibrate_on):
            raise CLIError("--save writes a fitted or calibrated memory: pass --fit-on or --calibrate-on too")
        # the whole model (the memory's buffers are in the weights, and fitting may change their width), staged
        save_model_in_place(model, Path(args.folder))
    print(format_art_report(art_report(model, tokenizer, texts)))
    return 0


def fitting_options(args) -> tuple:
    """The art-report options that shape a fitted memory (None where not given)."""
    return (
        args.input_transform,
        args.pooling,
        args.pool_layers,
        args.vigilance,
        args.beta,
        args.max_categories,
        args.outliers,
    )


def save_model_in_place(model, folder: Path) -> None:
    """
    Replace the model saved in `folder` as `gptb train` does: holding the folder's lock, write the whole model to
    `folder/.incoming`, then move it in with `config.json` last, so a kill at any point leaves the old model or the
    new one, never a mix (the next save or `gptb train` on the folder finishes or discards the move). Files the save
    does not write (the tokenizer, an edited card) stay.
    """
    from .output_folder import INCOMING, FolderInUse, FolderLock, complete_swap, publish_model

    try:
        lock = FolderLock(folder).acquire()
    except FolderInUse as error:
        raise CLIError(f"cannot save: {error}") from error
    try:
        complete_swap(folder)  # an earlier save's interrupted move
        staging = folder / INCOMING
        model.save_pretrained(staging)
        if (folder / "README.md").is_file():
            (staging / "README.md").unlink(missing_ok=True)  # keep the folder's card
        publish_model(staging, folder)
    finally:
        lock.release()


def _art_blocks(source: str, split: str, tokenizer, count: int, tokens: int):
    """Up to `count` blocks of `tokens` tokens from a built-in corpus (its `split`) or a text file."""
    import torch

    from .data import list_corpora, load_corpus, tokenize_and_chunk

    if source in list_corpora():
        texts = load_corpus(source, split=split, max_chars=count * tokens * 8)
    elif Path(source).is_file():
        texts = [Path(source).read_text(encoding="utf-8")]
    else:
        raise CLIError(f"{source} is neither a built-in corpus ({', '.join(list_corpora())}) nor a text file")
    blocks = tokenize_and_chunk(texts, tokenizer, block_size=tokens)[:count]
    if len(blocks) < 2:
        raise CLIError(f"{source} gives {len(blocks)} block(s) of {tokens} tokens; at least 2 are needed")
    return blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))]


def cmd_push(args) -> int:
    from httpx2 import TransportError  # huggingface_hub's HTTP client: a refused or failed connection
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    from .hub import push_folder

    try:
        url = push_folder(args.folder, args.repo_id, private=args.private, token=args.token)
    except LocalTokenNotFoundError as error:
        raise CLIError("not logged in to the Hub: run `hf auth login`, set HF_TOKEN or pass --token") from error
    except (HfHubHTTPError, ConnectionError, TransportError) as error:  # offline, refused, no rights: one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CLIError(f"could not upload to the Hub ({type(error).__name__}): {reason}") from error
    print(f"Pushed {args.folder} to {url}")
    return 0


def cmd_corpora(args) -> int:
    from .data import CORPORA, list_corpora

    for name in list_corpora():
        print(f"{name:14s} {CORPORA[name].description}")
    return 0


def cmd_bench(args) -> int:
    from .benchmarks.__main__ import main as bench_main

    return bench_main(args.rest)


def cmd_experiment(args) -> int:
    from .experiments.__main__ import main as experiment_main

    return experiment_main(args.rest)


if __name__ == "__main__":
    sys.exit(main())
