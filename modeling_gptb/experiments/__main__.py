"""`gptb experiment NAME [--preset cpu|gpu|mini] [--seeds N] [--out DIR]` (`python -m modeling_gptb.experiments`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import EXPERIMENTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptb experiment", description="Run a GPTB experiment.")
    parser.add_argument("name", choices=EXPERIMENTS, help="which experiment")
    parser.add_argument(
        "--preset", default="cpu", help="size: cpu, gpu, mini or one the experiment adds (default: cpu)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: 3; mini: 1)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ./gptb-experiments/NAME)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f".{args.name}", __package__)
    if args.preset not in module.PRESETS:
        print(
            f"--preset must be one of {', '.join(module.PRESETS)} for {args.name}, got {args.preset!r}",
            file=sys.stderr,
        )
        return 2
    n_seeds = args.seeds if args.seeds is not None else (1 if args.preset == "mini" else 3)
    if n_seeds < 1:
        print("--seeds must be >= 1", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else Path("gptb-experiments") / args.name
    out.mkdir(parents=True, exist_ok=True)
    module.run(args.preset, list(range(n_seeds)), out)
    print(f"{args.name}: report, JSON and plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
