"""Shared machinery of the experiments: presets, data, models, the training loop, evaluation, metrics, reports, plots.

Every experiment module defines `NAME`, `PRESETS` (dicts keyed "cpu", "gpu", "mini") and `run(preset, seeds, out)`
returning the JSON-able result dict. This module holds everything they share, so the three experiments train,
evaluate and report the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_gptb import GPTBConfig, GPTBLMHeadModel
from modeling_gptb.data import load_corpus, tokenize_and_chunk
from modeling_gptb.modeling_gptb import pool_outputs
from modeling_gptb.output_folder import crash_point
from modeling_gptb.throughput import state_update_flops
from modeling_gptb.tokenization import _bytes_to_unicode, byte_tokenizer, token_config_kwargs, train_tokenizer

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------------------
# Reproducibility and environment


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> dict:
    """Where the numbers came from (reports quote it)."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Data


def make_tokenizer(kind: str | int, texts: list[str]):
    """`"byte"`: the 258-token byte tokenizer; an int: a byte-level BPE of that size trained on `texts`."""
    if kind == "byte":
        return byte_tokenizer()
    return train_tokenizer(texts, vocab_size=int(kind))


def load_texts(corpus: str, split: str, max_chars: int) -> list[str]:
    return load_corpus(corpus, split=split, max_chars=max_chars)


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents as one 1-D token stream (eos after each document)."""
    blocks = tokenize_and_chunk(texts, tokenizer, block_size=2)
    return blocks.reshape(-1)


def blocks_of(stream: torch.Tensor, block: int, limit: int | None = None) -> torch.Tensor:
    n = len(stream) // block
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise ValueError(f"the stream has {len(stream)} tokens, fewer than one block of {block}")
    return stream[: n * block].view(n, block)


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for. Byte-level vocabularies: one symbol = one byte; specials count 1 byte
    (the document separator, as a newline would)."""
    byte_chars = set(_bytes_to_unicode())
    special = set(tokenizer.all_special_ids)
    lengths = torch.ones(len(tokenizer), dtype=torch.float64)
    for token, index in tokenizer.get_vocab().items():
        if index not in special and all(ch in byte_chars for ch in token):
            lengths[index] = len(token)
    return lengths


class BatchStream:
    """Contiguous chunks of `tokens_per_step` tokens in a seeded random order (epochs re-shuffle).

    Every model in a comparison draws the same chunks in the same order for a given seed; each reshapes a chunk to
    its own (batch, block) shape, so all see exactly the same tokens.
    """

    def __init__(self, stream: torch.Tensor, tokens_per_step: int, seed: int):
        self.chunks = blocks_of(stream, tokens_per_step)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> torch.Tensor:
        if not self.order:
            self.order = torch.randperm(len(self.chunks), generator=self.generator).tolist()
        return self.chunks[self.order.pop()]


# ---------------------------------------------------------------------------------------------------------------
# Models and their cost


def gptb_model(tokenizer, arch: dict, **overrides) -> GPTBLMHeadModel:
    config = GPTBConfig(
        **token_config_kwargs(tokenizer),
        n_embd=arch["n_embd"],
        n_layer=arch["n_layer"],
        n_head=arch["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **overrides,
    )
    config.n_positions = config.window_size  # M+1 (one token) or 2M+K (segments) positions: none unused
    return GPTBLMHeadModel(config)


def gpt2_model(tokenizer, arch: dict, context: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        **token_config_kwargs(tokenizer),
        n_embd=arch["n_embd"],
        n_layer=arch["n_layer"],
        n_head=arch["n_head"],
        n_positions=context,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _block_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".h." in f".{name}")


def train_flops_per_token(model, kind: str, context: int = 0) -> float:
    """Analytic training FLOPs per token (forward x 3: backward costs twice the forward).

    Forward, per token, with P the parameters of the L blocks, D the width, V the vocabulary:
      - GPT-2 at context T: 2P (matmuls) + 2·L·D·(T+1) (scores and weighted values, on average (T+1)/2 keys
        under the causal mask) + 2·D·V (the vocabulary projection);
      - GPTB with M state slots: one window of W = M+1 positions per token (W = 2M+K per K tokens for segment
        steps): (2P·W + 4·L·D·W² (every position attends to all W, whatever the mask: the implementation computes
        the full scores), plus the state update's projections (`throughput.state_update_flops`)) / K + 2·D·V.
    Embedding look-ups, LayerNorms, softmax and activations are left out (they are a few percent here).
    """
    config = model.config
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    p = _block_params(model)
    if kind == "gpt2":
        forward = 2 * p + 2 * layers * d * (context + 1) + 2 * d * vocab
    else:
        window, segment = config.window_size, config.segment_length
        per_step = 2 * p * window + 4 * layers * d * window**2 + state_update_flops(config)
        forward = per_step / segment + 2 * d * vocab
    return 3.0 * forward


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.05, final_frac: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `final_frac · peak` at `total`."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, train: dict) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train["lr"],
        betas=(0.9, 0.95),
    )


def train_model(
    model,
    batches: BatchStream,
    block: int,
    steps: int,
    train: dict,
    evaluate: Callable[[], dict] | None = None,
    eval_every: int = 0,
    desc: str = "train",
    optimizer=None,
    step_loss: Callable[[torch.nn.Module, torch.device], torch.Tensor] | None = None,
) -> dict:
    """AdamW with warm-up + cosine, gradient clipping 1.0; each step one chunk reshaped to (-1, block).

    `step_loss(model, device)`, when given, computes one step's loss instead (its own data, `batches` is then
    None and `block` is the number of tokens a step reads).

    Calls `evaluate()` at step 0, every `eval_every` steps and at the end. Returns a history dict:
    `step`, `tokens`, `train_loss` per step, `eval_step`, `eval_tokens`, `eval` (list of evaluate() dicts),
    `seconds` (training time, evaluation excluded), `sec_per_step`.
    """
    dev = device()
    model.to(dev)
    optimizer = optimizer or make_optimizer(model, train)
    history = {"step": [], "tokens": [], "train_loss": [], "eval_step": [], "eval_tokens": [], "eval": []}
    if step_loss is None:

        def step_loss(model, dev):
            x = batches.next().view(-1, block).to(dev)
            return model(input_ids=x, labels=x).loss

    tokens_per_step = block if batches is None else batches.chunks.shape[1]

    def run_eval(step):
        if evaluate is None:
            return
        history["eval_step"].append(step)
        history["eval_tokens"].append(step * tokens_per_step)
        history["eval"].append(evaluate())

    run_eval(0)
    seconds = 0.0
    for step in tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True):
        start = time.perf_counter()
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, train["lr"])
        loss = step_loss(model, dev)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds += time.perf_counter() - start
        history["step"].append(step + 1)
        history["tokens"].append((step + 1) * tokens_per_step)
        history["train_loss"].append(float(loss.detach()))
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            run_eval(step + 1)
    run_eval(steps)
    history["seconds"] = seconds
    history["sec_per_step"] = seconds / max(1, steps)
    return history


def window_logits(model, inputs: torch.Tensor, context: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Logits (N, T, V) of `inputs` (N, T), cut into consecutive windows of `context` tokens that each start from
    scratch (no overlap; None: one pass over the whole row). This is how a fixed-context model (GPT-2) and GPTB's
    no-memory control (every segment from the initial state) read a row longer than their window.

    `stride` (0 < stride <= context; None: `context`): windows of `context` tokens start every `stride` tokens
    (0, stride, 2·stride, ...) and each position's logits come from the first window that holds it. So position t
    is predicted from tokens 0..t while t < context, and from the last c tokens up to t after that, c between
    context - stride + 1 and context (stride 1: always exactly `context`; stride = context: the windows above).
    """
    n, t = inputs.shape
    if context is None or context >= t:
        return model(input_ids=inputs).logits
    if stride is not None and stride != context:
        if not 0 < stride < context:
            raise ValueError(f"stride must be between 1 and the context {context}, got {stride}")
        pieces, start, end = [], 0, 0
        while end < t:  # each window scores the positions the ones before it did not reach
            window = inputs[:, start : start + context]
            pieces.append(model(input_ids=window).logits[:, end - start :])
            start, end = start + stride, start + window.shape[1]
        return torch.cat(pieces, dim=1)
    pad = (-t) % context
    padded = torch.cat([inputs, inputs.new_zeros(n, pad)], dim=1)
    return model(input_ids=padded.reshape(-1, context)).logits.reshape(n, t + pad, -1)[:, :t]


@torch.no_grad()
def per_token_losses(
    model, blocks: torch.Tensor, batch_size: int, context: int | None = None, stride: int | None = None
) -> torch.Tensor:
    """Next-token losses (nats), shape (N, T-1): target t+1 predicted from tokens 0..t of its block.

    `context`: for a fixed-context model (GPT-2) shorter than the block, the block is cut into consecutive
    windows of `context` tokens that each start from scratch (`window_logits`, overlapping when `stride` is
    below `context`), so every model predicts the same targets; GPTB runs the whole block, carrying its state.
    """
    dev = device()
    model.eval()
    out = []
    for start in range(0, len(blocks), batch_size):
        x = blocks[start : start + batch_size].to(dev)
        inputs = x[:, :-1]
        n, t = inputs.shape
        logits = window_logits(model, inputs, context, stride)
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        out.append(losses.view(n, t).cpu())
    return torch.cat(out)


def bucket_means(losses: torch.Tensor, edges: list[int]) -> list[float]:
    """Mean of per-token losses (N, T) over all rows in each position bucket [edges[i], edges[i+1])."""
    if list(edges) != sorted(set(edges)) or edges[0] < 0 or edges[-1] > losses.shape[1]:
        raise ValueError(f"bucket edges must increase from >= 0 to <= {losses.shape[1]} positions, got {edges}")
    return [float(losses[:, a:b].double().mean()) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def loss_metrics(losses: torch.Tensor, blocks: torch.Tensor, byte_lengths: torch.Tensor) -> dict:
    """nats/token and bits/byte of per-token losses against the targets `blocks[:, 1:]`."""
    nats = losses.double().sum()
    nbytes = byte_lengths[blocks[:, 1:]].sum()
    return {"loss": float(nats / losses.numel()), "bpb": float(nats / LN2 / nbytes)}


@torch.no_grad()
def embeddings(model, blocks: torch.Tensor, batch_size: int, art: bool = True, poolings: Iterable = ()) -> dict:
    """Pooled representation (what ART sees), ART novelty (read only) and mean per-token loss of each block; for each
    `(art_pooling, art_pool_layers)` pair in `poolings`, `result[pair]` pools the same outputs that way."""
    dev = device()
    model.eval()
    poolings = list(poolings)
    columns = {key: [] for key in ["pooled", "loss", *poolings] + (["art_novelty"] if art else [])}
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            x = blocks[start : start + batch_size].to(dev)
            if poolings:
                outputs = model.transformer(input_ids=x, output_hidden_states=True)
                vectors = model.art_input(model.pool(outputs))
                for key in poolings:
                    columns[key].append(pool_outputs(outputs, None, *key).float().cpu())
            else:
                outputs, vectors = model.art_vectors(x)  # exactly what forward() feeds the memory
            columns["pooled"].append(vectors.float().cpu())
            if art:
                columns["art_novelty"].append(model.art_memory.novelty(vectors).float().cpu())
            logits = model.lm_head(outputs.last_hidden_state)
            per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
            columns["loss"].append(per_token.mean(dim=1).cpu())
    return {key: torch.cat(values) for key, values in columns.items()}


# ---------------------------------------------------------------------------------------------------------------
# Detection metrics (no sklearn)


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve with the novel (`out`) samples as positives: P(out > in) + ½ P(out = in).

    Mann-Whitney U with average ranks for ties: 1.0 for perfectly separated scores, 0.5 for identical ones.
    """
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.asarray(out_scores, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("auroc needs at least one score on each side")
    scores = np.concatenate([a, b])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < scores.size:  # average ranks over runs of ties
        j = i
        while j + 1 < scores.size and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_sum_out = ranks[a.size :].sum()
    u = rank_sum_out - b.size * (b.size + 1) / 2.0
    return float(u / (a.size * b.size))


def fpr_at_tpr(in_scores, out_scores, tpr: float = 0.95) -> float:
    """Share of in-domain samples flagged novel at the highest threshold that flags >= `tpr` of the novel ones.

    A sample is flagged when its score >= threshold. 0 is perfect; identical distributions give about `tpr`.
    """
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.sort(np.asarray(out_scores, dtype=np.float64).ravel())[::-1]
    k = max(1, math.ceil(tpr * b.size - 1e-9))
    threshold = b[k - 1]
    return float((a >= threshold).mean())


def roc_curve(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) over all thresholds, novel = positive."""
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.asarray(out_scores, dtype=np.float64).ravel()
    thresholds = np.unique(np.concatenate([a, b]))[::-1]
    fpr = np.array([0.0] + [(a >= t).mean() for t in thresholds])
    tpr = np.array([0.0] + [(b >= t).mean() for t in thresholds])
    return fpr, tpr


# ---------------------------------------------------------------------------------------------------------------
# Aggregation, reports, plots


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(records: list[dict], keys: Iterable[str]) -> dict:
    """`{key}_mean` and `{key}_std` over the seeds' records (dicts of numbers) for each key."""
    summary = {}
    for key in keys:
        summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std(r[key] for r in records)
    return summary


def fmt(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def save_results(result: dict, out: Path, plots, report) -> dict:
    """The end of every experiment: check the numbers, then write the plots, the report and results.json."""
    check_finite(result)
    out.mkdir(parents=True, exist_ok=True)
    plots(result, out)
    report(result, out)
    write_json(out / "results.json", result)
    return result


def start_run(name: str, preset: str, config: dict, seeds: list[int]) -> dict:
    """What an experiment runs (its result's first fields) and when it started; `finish_run` completes it."""
    return {"experiment": name, "preset": preset, "config": config, "seeds": seeds, "started": time.time()}


def finish_run(header: dict, out: Path, plots, report, **fields) -> dict:
    """The result every experiment returns (what ran, where, how long, then `fields`), saved by `save_results`."""
    header = dict(header)
    elapsed = time.time() - header.pop("started")
    # a combined result keeps the machine its parts ran on, not the combining process's
    result = {**header, "machine": header.get("machine", machine()), "elapsed_s": elapsed, **fields}
    return save_results(result, out, plots, report)


def write_json(path: Path, data: dict) -> Path:
    """Written whole or not at all: to a temporary file beside `path`, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path


class FinishedRuns:
    """
    The finished (model, seed) records of an experiment in `out/runs/KEY/seed-N.json`, each saved as it ends, so a
    killed experiment keeps what finished, and the next run of the same experiment and preset config into the same
    folder reads them back instead of training again (records of another config are trained again, and replaced).
    """

    def __init__(self, out: Path, header: dict, config: dict | None = None):
        """`config`: what the records are stamped with, where not the whole `header["config"]`."""
        self.folder = out / "runs"
        made_by = {key: header[key] for key in ("experiment", "preset")} | {"config": config or header["config"]}
        self.stamp = hashlib.sha256(json.dumps(made_by, sort_keys=True, default=float).encode()).hexdigest()
        self.header = header  # counts the records read back, so the report's wall time says it is this call's
        header.setdefault("records_read_back", 0)

    def path(self, key: str, seed: int) -> Path:
        return self.folder / key / f"seed-{seed}.json"

    def get(self, key: str, seed: int) -> dict | None:
        path = self.path(key, seed)
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("stamp") != self.stamp:
            return None
        print(f"{key} seed {seed}: finished earlier, read from {path}")
        self.header["records_read_back"] += 1
        return saved["record"]

    def save(self, key: str, seed: int, record: dict) -> dict:
        """Save `record` and return it as saved (JSON types), so a resumed run sees what an uninterrupted one does."""
        record = json.loads(json.dumps(record, default=float))
        path = self.path(key, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"stamp": self.stamp, "record": record})
        crash_point("experiment-record-saved")
        return record

    def run(self, key: str, seed: int, train: Callable[..., dict], *args, **kwargs) -> dict:
        """The saved record of (key, seed), or that of `train(*args, **kwargs)`, saved."""
        saved = self.get(key, seed)
        return saved if saved is not None else self.save(key, seed, train(*args, **kwargs))


def write_report(path: Path, title: str, sections: list[str]) -> Path:
    path.write_text(f"# {title}\n\n" + "\n\n".join(s.strip() for s in sections) + "\n")
    return path


def experiment_report(out: Path, title: str, result: dict, sections: list[str]) -> Path:
    """`out/report.md`: the title, the command/seeds/machine/preset header, then `sections`."""
    header = header_section(
        result["experiment"],
        result["preset"],
        result["seeds"],
        result["config"],
        result["elapsed_s"],
        result["machine"],
        result.get("records_read_back", 0),
        result.get("combined_parts"),
    )
    return write_report(out / "report.md", title, [header, *sections])


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str | None = None) -> None:
    """Title the figure, lay it out, write it as a PNG and free it."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def finish_axes(*axes, legend: bool = True, grid_axis: str = "both", **legend_kwargs) -> None:
    """A light grid (on `grid_axis`) and, with `legend`, the legend on each of `axes`."""
    for ax in axes:
        ax.grid(alpha=0.3, axis=grid_axis)
        if legend:
            ax.legend(**legend_kwargs)


def bars(ax, names: list[str], summary: dict, key: str, ylabel: str, title: str) -> None:
    """One bar per name: `summary[name][key_mean]` with `key_std` as error bar."""
    ax.bar(names, [summary[n][f"{key}_mean"] for n in names], yerr=[summary[n][f"{key}_std"] for n in names])
    ax.set(ylabel=ylabel, title=title)
    finish_axes(ax, legend=False, grid_axis="y")


def shaded(ax, x, runs: list[list[float]], label: str, **kwargs) -> None:
    """Mean over seeds as a line, ± one standard deviation shaded (nothing shaded for one seed)."""
    y = np.asarray(runs, dtype=np.float64)
    mean = y.mean(axis=0)
    line = ax.plot(x, mean, label=label, **kwargs)[0]
    if len(y) > 1:
        std = y.std(axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)


def header_section(
    name: str,
    preset: str,
    seeds: list[int],
    config: dict,
    elapsed: float,
    machine_info: dict,
    read_back: int = 0,
    parts: int | None = None,
) -> str:
    """The report's first lines; `read_back` (model, seed) records finished in earlier calls are not in the time; a
    result combined from `parts` runs gives their summed time, which is not a wall time when they ran side by side."""
    earlier = (
        f" in this call; {read_back} finished (model, seed) runs read back from earlier calls" if read_back else ""
    )
    time_line = f"Wall time: {elapsed / 60:.1f} min{earlier}"
    if parts:
        time_line = (
            f"Time: {elapsed / 60:.1f} min, summed over the {parts} runs combined (some may have run side by side)"
        )
    return (
        f"Command: `gptb experiment {name} --preset {preset} --seeds {len(seeds)}`  \n"
        f"Seeds: {seeds}. {time_line}.  \n"
        f"Machine: {json.dumps(machine_info)}\n\n"
        f"<details><summary>Preset</summary>\n\n```json\n{json.dumps(config, indent=2)}\n```\n</details>"
    )


def check_finite(data, path: str = "") -> None:
    """Raise if any float in a nested JSON-able structure is NaN or infinite."""
    if isinstance(data, dict):
        for key, value in data.items():
            check_finite(value, f"{path}.{key}")
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            check_finite(value, f"{path}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        raise ValueError(f"non-finite number at {path or 'root'}: {data}")
