"""The front of the `gptb` command: its parser and the dispatch to the commands, importing neither torch nor
transformers, so `gptb --help`, `gptb train --help` and an argument error answer at once. The commands themselves are
in `modeling_gptb.cli` (and `modeling_gptb.train`), imported once the arguments are good."""

import argparse
import sys

from .train_args import build_parser as build_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptb", description="GPTB: GPT-2 made recurrent, with an ART memory.")
    commands = parser.add_subparsers(dest="command", required=True)

    build_train_parser(commands.add_parser("train", help="train a GPTB model (Accelerate)"))

    tokenizer_help = "tokenizer folder or Hub id, for a model folder saved without one (default: the model folder)"
    generate = commands.add_parser(
        "generate",
        help="stream text from a saved model",
        description="Stream a sample from a saved GPTB model (a `gptb train` or save_pretrained folder).",
    )
    generate.add_argument("folder", help="the model folder")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--tokenizer", help=tokenizer_help)
    generate.add_argument("--max_new_tokens", type=int, default=100, help="tokens to generate (default: %(default)s)")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    generate.add_argument("--top_k", type=int, default=40, help="sample from the top k tokens (default: %(default)s)")
    generate.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    generate.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed to stderr)")

    report = commands.add_parser(
        "art-report",
        help="ART categories, counts and the novelty of given text",
        description="What the model's ART memory holds, and how novel the given texts look to it.",
    )
    report.add_argument("folder", help="the model folder")
    report.add_argument("--text", action="append", help="a text to score (repeatable)")
    report.add_argument("--file", action="append", help="a file whose text to score (repeatable)")
    report.add_argument("--tokenizer", help=tokenizer_help)
    report.add_argument(
        "--fit-on",
        help="rebuild the memory from the trained model's states on this text: a built-in corpus (its train split) "
        "or a text file",
    )
    report.add_argument(
        "--input-transform",
        choices=("none", "center", "euclidean", "standardize"),  # ART_INPUT_TRANSFORMS, without importing torch
        help="with --fit-on: what the memory sees",
    )
    report.add_argument("--vigilance", type=float, help="with --fit-on: the memory's vigilance")
    report.add_argument("--beta", type=float, help="with --fit-on: the memory's learning rate (art_beta)")
    report.add_argument("--max-categories", type=int, help="with --fit-on: the memory's capacity (art_max_categories)")
    report.add_argument(
        "--pooling",
        choices=("mean", "state", "last", "mean_std_max"),  # ART_POOLINGS, without importing torch
        help="with --fit-on: how each text's steps are pooled for the memory (art_pooling)",
    )
    report.add_argument(
        "--pool-layers",
        choices=("last", "all"),  # ART_POOL_LAYERS
        help="with --fit-on: pool the last layer or the embeddings and every layer (art_pool_layers); the novelty "
        "detector that works best: --pooling mean_std_max --pool-layers all --input-transform standardize "
        "--vigilance 0.98 --beta 0.1, with --max-categories about half of --blocks",
    )
    report.add_argument(
        "--outliers",
        action="append",
        metavar="CORPUS_OR_FILE",
        help="with --fit-on: text that is neither the model's domain nor what you mean to detect (other languages, "
        "random characters; a built-in corpus or a text file; repeatable): fit the outlier probe against it, and "
        "calibrate the 'outliers' score (docs/design.md#outlier-exposure)",
    )
    report.add_argument(
        "--calibrate-on",
        help="calibrate the verdict on held-out in-domain text: a built-in corpus (its validation split) or a text "
        "file",
    )
    report.add_argument(
        "--fpr", type=float, default=0.05, help="share of in-domain text called novel (default: %(default)s)"
    )
    report.add_argument("--blocks", type=int, default=500, help="blocks to fit or calibrate on (default: %(default)s)")
    report.add_argument(
        "--block-tokens",
        type=int,
        default=64,
        help="tokens per block to fit and calibrate on; score texts of about that length (default: %(default)s; "
        "128 separated the novelty experiment's domains best)",
    )
    report.add_argument("--save", action="store_true", help="write the fitted or calibrated memory into the folder")

    push = commands.add_parser(
        "push",
        help="upload a saved model folder to the Hugging Face Hub",
        description="Upload a saved GPTB model folder to the Hub as it is, model card included "
        "(checkpoints/ and temporary files stay local).",
    )
    push.add_argument("folder", help="the model folder")
    push.add_argument("repo_id", help="the Hub repo, for example your-name/gptb-tiny (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--token", help="Hub token (default: the one `hf auth login` saved, or HF_TOKEN)")

    commands.add_parser("corpora", help="list the embedded corpora")
    for name, text in (("bench", "run the benchmarks"), ("experiment", "run an experiment")):
        sub = commands.add_parser(name, help=text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("bench", "experiment"):  # they own their options (argparse's REMAINDER refuses "--x")
        from types import SimpleNamespace

        from modeling_gptb import cli

        handler = cli.cmd_bench if argv[0] == "bench" else cli.cmd_experiment
        return handler(SimpleNamespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from modeling_gptb.train import main as train_main

        return train_main(argv[1:])
    from modeling_gptb import cli

    handlers = {
        "generate": cli.cmd_generate,
        "art-report": cli.cmd_art_report,
        "push": cli.cmd_push,
        "corpora": cli.cmd_corpora,
    }
    try:
        return handlers[args.command](args)
    except (cli.CLIError, ValueError, FileNotFoundError) as error:
        print(f"gptb {args.command}: error: {error}", file=sys.stderr)
        return 2
