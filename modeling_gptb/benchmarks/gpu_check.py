"""The GPU checks of issue 10, run by `gpu_check.sh` on a CUDA machine; every figure goes to JSON under `--output`.

    python -m modeling_gptb.benchmarks.gpu_check decode --output OUT      CUDA-graph decoding vs eager, gptb-small
    python -m modeling_gptb.benchmarks.gpu_check train-log LOG --output OUT  tokens/s and MFU of a `gptb train` log
    python -m modeling_gptb.benchmarks.gpu_check art --output OUT         the ART device engine vs our CPU update

`decode`: on gptb-small's dimensions in bf16 (ART off), generate() with `decode_cuda_graph` must give the eager
tokens (greedy, sampling with a seed, beam search) and logits within bf16 tolerance; then per-token latency at batch 1
(and 64), eager vs graph, timed interleaved, and the same with the step's window compiled. The JSON is rewritten
after each part, so a part cut off by a timeout keeps what the earlier ones measured.

`art`: issue 10's ART goal, >= 10x our CPU update for both rules at dim 768, 1,000 categories, 20,000 updates (the
benchmark's streams, `benchmarks/art.py`): updates/s of the device engine on the GPU (and of the block engine there),
of the block engine on the CPU, host reads per call, and whether the GPU gives the CPU's categories and statuses.
"""

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from modeling_gptb import GPTBConfig, GPTBLMHeadModel
from modeling_gptb.presets import load_model_preset

from . import art as art_bench
from .common import SIZES, Context, time_once
from .generate import GRAPH_GOAL_SECONDS, Decoder, graph_twin

BF16_RELATIVE_TOLERANCE = 2**-7  # one bf16 rounding step, relative to the largest logit


def gptb_small(device) -> GPTBLMHeadModel:
    config = GPTBConfig(**{**load_model_preset("gptb-small"), "art_enabled": False})
    torch.manual_seed(0)
    return GPTBLMHeadModel(config).to(device=device, dtype=torch.bfloat16).eval()


def generate_pair(model, twin, seed=None, **kwargs) -> dict:
    outs = []
    for which in (model, twin):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(which.generate(**kwargs, return_dict_in_generate=True, output_scores=True, pad_token_id=0))
    eager, graph = outs
    gap, scale = 0.0, 0.0
    for eager_scores, graph_scores in zip(eager.scores, graph.scores, strict=True):
        finite = torch.isfinite(eager_scores)  # sampling filters set scores to -inf
        if not torch.equal(finite, torch.isfinite(graph_scores)):
            gap = float("inf")
            continue
        gap = max(gap, float((eager_scores[finite].float() - graph_scores[finite].float()).abs().max()))
        scale = max(scale, float(eager_scores[finite].float().abs().max()))
    return {
        "same_tokens": bool(torch.equal(eager.sequences, graph.sequences)),
        "max_score_gap": gap,
        "within_bf16_tolerance": gap <= BF16_RELATIVE_TOLERANCE * scale,
        "largest_score": scale,
    }


def exactness(model, twin, device) -> dict:
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 16), device=device)
    batch_prompt = torch.randint(0, vocab, (4, 16), device=device)
    return {
        "greedy_batch_1": generate_pair(model, twin, input_ids=prompt, max_new_tokens=64, do_sample=False),
        "greedy_batch_4": generate_pair(model, twin, input_ids=batch_prompt, max_new_tokens=32, do_sample=False),
        "sampling_batch_4": generate_pair(
            model, twin, seed=1, input_ids=batch_prompt, max_new_tokens=32, do_sample=True, top_k=50
        ),
        "beam_4_batch_2": generate_pair(
            model, twin, input_ids=batch_prompt[:2], max_new_tokens=16, num_beams=4, do_sample=False
        ),
        "graphs_captured": [list(map(str, key)) for key in twin.decode_graphs.steps],
    }


def latency(model, twin, device, batch, rounds=200) -> dict:
    decoders = {"eager": Decoder(model, batch), "graph": Decoder(twin, batch)}
    for decoder in decoders.values():
        for _ in range(3):  # the prompt step, the capture and a warm replay
            decoder.step()
    times = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, decoder in decoders.items():
            times[name].append(time_once(decoder.step, device))
    return {f"{name}_ms": statistics.median(values) * 1e3 for name, values in times.items()}


def decode(output: Path) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "goal_ms": 1e3 * 0.5e-3}
    path = output / "gpu_check_decode.json"

    def save():
        path.write_text(json.dumps(result, indent=2) + "\n")

    model = gptb_small(device)
    twin = graph_twin(model)
    parts = [
        ("exactness", lambda: exactness(model, twin, device)),
        ("latency_batch_1", lambda: latency(model, twin, device, 1)),
        ("latency_batch_64", lambda: latency(model, twin, device, 64, rounds=50)),
    ]
    for name, part in parts:
        result[name] = run_part(part)
        save()
    model.transformer.compile_step()  # shared by the twin: both now run the compiled window
    twin.decode_graphs.steps.clear()  # recapture over the compiled kernels
    result["compiled_latency_batch_1"] = run_part(lambda: latency(model, twin, device, 1))
    result["compiled_exactness_greedy"] = run_part(
        lambda: generate_pair(
            model, twin, input_ids=torch.randint(0, 50257, (1, 16), device=device), max_new_tokens=32, do_sample=False
        )
    )
    best = [
        part.get("graph_ms")
        for part in (result["latency_batch_1"], result["compiled_latency_batch_1"])
        if isinstance(part, dict) and "graph_ms" in part
    ]
    result["goal_met"] = bool(best) and min(best) <= GRAPH_GOAL_SECONDS * 1e3
    save()
    print(json.dumps(result, indent=2))
    return 0


def art(output: Path, updates: int = 20_000, categories: int = 1_000) -> int:
    from modeling_gptb import art_device_engine

    path = output / "gpu_check_art.json"
    device = torch.device("cuda")
    result = {"dim": 768, "categories": categories, "updates": updates, "cpu_threads": torch.get_num_threads()}
    reads = []
    read_back = art_device_engine._read_back

    def counted(values):
        reads.append(1)
        return read_back(values)

    art_device_engine._read_back = counted
    for rule in ("cosine", "fuzzy"):
        result[rule] = run_part(lambda rule=rule: art_rule(rule, updates, categories, device, reads))
        path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def art_rule(rule: str, updates: int, categories: int, device: torch.device, reads: list) -> dict:
    ctx = Context(SIZES["gpu"], device)
    stream, memory, _ = art_bench.build(ctx, rule, categories, updates, device)
    start = {name: tensor.clone() for name, tensor in memory.state_dict().items()}
    rows = stream.to(device)

    def timed(engine):
        memory.engine = engine
        memory.load_state_dict(start)
        return time_once(lambda: memory.update(rows), device)

    part = {}
    for engine in ("device", "block"):
        timed(engine)  # warm-up
        reads.clear()
        seconds = statistics.median(timed(engine) for _ in range(3 if engine == "device" else 1))
        part[f"gpu_{engine}_updates_per_s"] = updates / seconds
        if engine == "device":
            part["device_reads_per_call"] = len(reads) / 3
    memory.engine = "device"
    memory.load_state_dict(start)
    gpu = memory.update(rows)
    gpu_weight = memory.weight.double().cpu()
    _, cpu_memory, _ = art_bench.build(ctx, rule, categories, updates, torch.device("cpu"))
    begin = time.perf_counter()
    cpu = cpu_memory.update(stream)
    part["cpu_block_updates_per_s"] = updates / (time.perf_counter() - begin)
    part["ratio_device_gpu_over_cpu"] = part["gpu_device_updates_per_s"] / part["cpu_block_updates_per_s"]
    part["goal_met"] = part["ratio_device_gpu_over_cpu"] >= 10
    part["same_decisions_as_cpu"] = bool(
        torch.equal(gpu.category.cpu(), cpu.category) and torch.equal(gpu.status.cpu(), cpu.status)
    )
    part["max_prototype_difference"] = float((gpu_weight - cpu_memory.weight.double()).abs().max())
    part["categories_after"] = int(memory.num_committed)
    return part


def run_part(part):
    try:
        return part()
    except Exception as error:  # keep going: the other parts still measure
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def train_log(log: Path, output: Path) -> int:
    """tokens/s and MFU of each logging window of a `gptb train` log (its progress-bar postfix)."""
    text = log.read_text(errors="replace")
    windows = []
    for match in re.finditer(r"loss=([0-9.]+)(?:, mfu=([0-9.]+)%)?, tok_s=([0-9]+)", text):
        window = {"loss": float(match[1]), "tokens_per_s": int(match[3])}
        if match[2] is not None:
            window["mfu"] = float(match[2]) / 100
        if not windows or windows[-1] != window:  # the bar repeats its postfix on every redraw
            windows.append(window)
    steady = windows[1:] or windows  # the first window pays for compiling
    result = {"windows": windows, "goal_tokens_per_s": 25_000}
    for key in ("tokens_per_s", "mfu"):
        values = [window[key] for window in steady if key in window]
        result[f"steady_{key}"] = statistics.median(values) if values else None
    (output / "gpu_check_train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if windows else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modeling_gptb.benchmarks.gpu_check", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("decode").add_argument("--output", type=Path, required=True)
    art_parser = commands.add_parser("art")
    art_parser.add_argument("--output", type=Path, required=True)
    art_parser.add_argument("--updates", type=int, default=20_000)
    summarize = commands.add_parser("train-log")
    summarize.add_argument("log", type=Path)
    summarize.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.command in ("decode", "art"):
        if not torch.cuda.is_available():
            print(f"gpu_check: {args.command} needs a CUDA device; torch sees none", file=sys.stderr)
            return 2
        return decode(args.output) if args.command == "decode" else art(args.output, args.updates)
    return train_log(args.log, args.output)


if __name__ == "__main__":
    sys.exit(main())
