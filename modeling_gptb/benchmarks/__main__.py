"""`gptb bench` (or `python -m modeling_gptb.benchmarks`): GPTB and ARTMemory against GPT-2, the original loop and the
hardware.

Prints a markdown table and writes the figures as JSON and the table as markdown into the current directory
(`gptb-bench-<device>.json`, `gptb-bench-<device>.md`) or `--output DIR`. Method: docs/design.md#how-speed-is-measured.
"""

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from .common import SIZES, Context, pick_device, sizes_dict

DESCRIPTION = "Benchmark GPTB and ARTMemory against GPT-2, the one-at-a-time ART loop and the hardware."
SECTIONS = ("matmul", "step", "generate", "segments", "art", "trainer")
# One CPU thread unless asked: on a shared machine torch's OpenMP workers make every small op of a step wait for a
# worker the neighbours have descheduled. Measured on the shared 2-core machine under load: the quick inference step
# ran 10x slower on 2 threads than on 1, while a lone GEMM ran 3x faster. Pass --threads on a dedicated machine.
THREADS = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptb bench", description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="CPU sizes that finish in a few minutes")
    parser.add_argument("--size", choices=sorted(SIZES), help="sizes by name (default: gpu on CUDA, else full)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--only", help=f"comma-separated sections to run, of: {','.join(SECTIONS)}")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default 1 on the CPU: see THREADS; on a GPU, torch's choice)",
    )
    parser.add_argument(
        "--compile",
        metavar="MODE",
        help="torch.compile the GPTB step in the step and generate sections (default, max-autotune, ...)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("."), help="folder for gptb-bench-<device>.json and .md (default: .)"
    )
    return parser


def table(results: dict, machine: dict, sizes) -> str:
    """The markdown block for the README: one line per figure, goals and whether they are met."""
    if "gpu" in machine:
        device = f"{machine['gpu']} (host: {machine['cpu']})"
    else:
        device = f"{machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch thread(s)"
    lines = [
        f"Machine: {device}; {machine['platform']}; torch {machine['torch']}.",
        "",
        f"Sizes `{sizes.name}`: step and generate model D={sizes.n_embd}, L={sizes.n_layer}, H={sizes.n_head}, "
        f"M={sizes.state_size}, V={sizes.vocab_size:,}, {sizes.dtype}; step batch B={sizes.batch}, T={sizes.steps}.",
        "Ratios are GPTB (or ours) over the baseline, timed interleaved in the same run.",
        "",
        "| Section | Measure | GPTB / ours | Baseline | Ratio | Goal | Met |",
        "|---|---|---|---|---|---|---|",
    ]
    for section, result in results.items():
        for entry in result["rows"]:
            met = {True: "yes", False: "**no**", None: ""}[entry["met"]]
            cells = [section, entry["measure"], entry["value"], entry["baseline"], entry["ratio"], entry["goal"], met]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `gptb bench -- --quick`: the separator the gptb command line needs before options
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or THREADS)
    size = args.size or ("quick" if args.quick else "gpu" if device.type == "cuda" else "full")
    ctx = Context(SIZES[size], device, compile_mode=args.compile)
    only = SECTIONS if not args.only else tuple(name.strip() for name in args.only.split(","))
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        print(f"benchmarks: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2

    results = {}
    for name in SECTIONS:
        if name not in only:
            continue
        begin = time.perf_counter()
        print(f"[{name}] running ...", file=sys.stderr, flush=True)
        results[name] = importlib.import_module(f".{name}", __package__).run(ctx)
        results[name]["wall_seconds"] = time.perf_counter() - begin
        print(f"[{name}] done in {results[name]['wall_seconds']:.1f} s", file=sys.stderr, flush=True)

    machine = ctx.machine()
    markdown = table(results, machine, ctx.sizes)
    print(markdown)
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = args.output / f"gptb-bench-{device.type}.json"
    markdown_path = args.output / f"gptb-bench-{device.type}.md"
    payload = {
        "machine": machine,
        "compile": args.compile,
        "device": device.type,
        "sizes": sizes_dict(ctx.sizes),
        "sections": results,
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    markdown_path.write_text(markdown)
    print(f"wrote {json_path} and {markdown_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
