"""The `gptb` command: train, generate, art-report, push, corpora, bench, experiment."""

import argparse
import sys
from pathlib import Path


class CLIError(RuntimeError):
    """A problem the user can act on: printed as one line, exit status 2."""


def load_folder(folder: str):
    """A saved GPTB model and its tokenizer, or a clear error saying what the folder lacks."""
    import torch  # noqa: F401  (fail early with torch's own message if it is missing)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_gptb  # noqa: F401  (registers GPTB with the Auto classes)

    path = Path(folder)
    if not path.is_dir():
        raise CLIError(f"{folder} is not a folder; pass the output folder of `gptb train` or a save_pretrained folder")
    if not (path / "config.json").is_file():
        raise CLIError(f"{folder} holds no config.json: not a saved model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as error:
        raise CLIError(f"could not load the model in {folder}: {error}") from error
    return model.eval(), tokenizer


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    model, tokenizer = load_folder(args.folder)
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
    )
    return 0


def cmd_art_report(args) -> int:
    from .art_report import art_report, format_art_report

    texts = list(args.text or [])
    for file in args.file or []:
        if not Path(file).is_file():
            raise CLIError(f"--file {file} is not a file; pass a text file whose text to score")
        texts.append(Path(file).read_text(encoding="utf-8"))
    model, tokenizer = load_folder(args.folder)
    if model.art_memory is None:
        raise CLIError(f"the model in {args.folder} has no ART memory (config.art_enabled is false)")
    print(format_art_report(art_report(model, tokenizer, texts)))
    return 0


def cmd_push(args) -> int:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from .hub import push_folder

    try:
        url = push_folder(args.folder, args.repo_id, private=args.private, token=args.token)
    except (HfHubHTTPError, OfflineModeIsEnabled) as error:  # not logged in, no network, no rights: one line
        raise CLIError(f"the Hub refused the upload: {error}") from error
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


def build_parser() -> argparse.ArgumentParser:
    from .train import build_parser as build_train_parser

    parser = argparse.ArgumentParser(prog="gptb", description="GPTB: GPT-2 made recurrent, with an ART memory.")
    commands = parser.add_subparsers(dest="command", required=True)

    build_train_parser(commands.add_parser("train", help="train a GPTB model (Accelerate)"))

    generate = commands.add_parser("generate", help="stream text from a saved model")
    generate.add_argument("folder")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max_new_tokens", type=int, default=100)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top_k", type=int, default=40)
    generate.add_argument("--greedy", action="store_true")
    generate.add_argument("--seed", type=int, default=0)

    report = commands.add_parser("art-report", help="ART categories, counts and the novelty of given text")
    report.add_argument("folder")
    report.add_argument("--text", action="append", help="a text to score (repeatable)")
    report.add_argument("--file", action="append", help="a file whose text to score (repeatable)")

    push = commands.add_parser("push", help="upload a saved model folder to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token")

    commands.add_parser("corpora", help="list the embedded corpora")
    for name, text in (("bench", "run the benchmarks"), ("experiment", "run an experiment")):
        sub = commands.add_parser(name, help=text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # bench and experiment own their options (argparse's REMAINDER refuses ones that start with "--")
    if argv and argv[0] in ("bench", "experiment"):
        from types import SimpleNamespace

        handler = cmd_bench if argv[0] == "bench" else cmd_experiment
        return handler(SimpleNamespace(rest=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        from .train import main as train_main

        return train_main(argv[1:])
    handlers = {
        "generate": cmd_generate,
        "art-report": cmd_art_report,
        "push": cmd_push,
        "corpora": cmd_corpora,
        "bench": cmd_bench,
        "experiment": cmd_experiment,
    }
    try:
        return handlers[args.command](args)
    except (CLIError, ValueError, FileNotFoundError) as error:
        print(f"gptb {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
