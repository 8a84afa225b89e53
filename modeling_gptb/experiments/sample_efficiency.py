"""Sample efficiency: does GPTB learn more per token (and per FLOP) than GPT-2 of the same size?

Models, all with the same width, depth, heads, tokenizer (byte-level BPE trained on the training text), data (the
same chunks in the same order for a seed), optimiser (AdamW, betas 0.9/0.95, weight decay 0.1, clip 1.0),
schedule (5% linear warm-up, cosine to 10%) and token budget:

- `gptb`: GPTB, `state_size` 8, `rebias=True`, trained on blocks of `gptb_block` tokens (BPTT over the block);
- `gpt2_ctx64`, `gpt2_ctx256`: `transformers.GPT2LMHeadModel` trained on blocks of 64 / 256 tokens;
- ablations: `gptb_M1`, `gptb_M32` (state_size 1 / 32) and `gptb_norebias` (`rebias=False`: the causal mask
  hides the token from the state, which the design predicts makes the state useless);
- segment steps (a preset's `segment`, issue 18): `gptb_segK`, GPTB with `segment_length` K trained on blocks of
  several segments (the state carried across them), and its no-memory control `gptb_segK_nomem`, the same model
  trained and evaluated on rows of K tokens, so every segment reads the initial state (`common.window_logits`);
- state-update variants (a preset's `gptb_variants`: name -> `GPTBConfig` overrides), e.g. `gptb_selective`, the
  configuration the memory benchmark recommends, which the `memory` preset runs against the seed's step and the
  control for three times the `cpu` budget.

Held-out loss: the validation split of `stdlib-docs`, cut into blocks of `eval_block` (256) tokens; every model
predicts the same 255 targets per block (GPT-2 at context 64 in four fresh windows, GPTB in one pass carrying its
state). Reported in nats/token and bits/byte, against tokens seen and against analytic training FLOPs
(`common.train_flops_per_token`).

Loss by position (a preset's `position`, issue 18 item 2), once per trained (model, seed) at the end of training:
the validation documents of at least `doc_tokens` tokens, each cut to its first `doc_tokens` tokens and preceded
by the document separator (eos, as in the training stream), so target p is the document's token p. Mean loss
per position bucket (`buckets`, e.g. 0-64, 64-256, 256-1024, 1024-2048) and per `resolution` tokens. How each
model forms the context of target p: GPTB reads the whole document in one pass, carrying its state; its
no-memory control reads it one segment at a time, every segment from the initial state (its training rows);
GPT-2 at context C reads windows of C tokens that start every C/2 tokens, each target scored by the first window
that holds it, so it sees the whole document prefix while p < C and then the last C/2 + 1 to C tokens.

Time, default `cpu` preset on 2 shared CPU cores (OMP_NUM_THREADS=1), from step times measured with this preset
(width 128, depth 2, 4 heads, vocabulary 1024, 1024 tokens/step): GPTB M=8 0.44 s/step, M=1 0.15, M=32 1.32,
rebias=False 0.41, GPT-2 ctx 64 0.06, ctx 256 0.07 -> 2.45 s per step of all six models; evaluation (40 blocks of
256 tokens) 1.3 / 0.5 / 4.0 / 1.3 / 0.2 / 0.2 s, 5 times per run -> ~38 s per seed. 220 steps x 3 seeds:
3 x (220 x 2.45 + 38) ≈ 1730 s ≈ 29 minutes (+ ~5 s corpus and tokenizer). Shared machines drift by +-30%.
`memory`: GPTB (seed's step), `gptb_selective`, `gptb_norebias` (0.44 / ~0.5 / 0.41 s/step) and the two GPT-2s, 660
steps (1.08 epochs of the training text) x 3 seeds ≈ 50 minutes on one quiet core. `mini` takes a few seconds;
`gpu` is sized for one modern CUDA GPU (untimed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import common
from .memory import SELECTIVE

NAME = "sample_efficiency"

_ARCH_CPU = {"n_embd": 128, "n_layer": 2, "n_head": 4}
_CPU = {
    "corpus": "stdlib-docs",
    "train_chars": 1_600_000,
    "val_chars": 120_000,
    "tokenizer": 1024,
    "arch": _ARCH_CPU,
    "tokens_per_step": 1024,
    "steps": 220,
    "gptb_block": 64,
    "eval_block": 256,
    "eval_blocks": 40,
    "eval_every": 55,
    "eval_batch": 20,
    "train": {"lr": 2e-3, "weight_decay": 0.1},
    "state_size": 8,
    "ablation_state_sizes": [1, 32],
    "gpt2_contexts": [64, 256],
}
PRESETS = {
    "cpu": _CPU,
    # the memory rerun (issue 13): the selective update against the seed's step and the control, 3x the steps
    "memory": {
        **_CPU,
        "steps": 660,
        "eval_every": 110,
        "ablation_state_sizes": [],
        "gptb_variants": {"gptb_selective": SELECTIVE},
    },
    # issue 18: segment GPTB (K = 64) against its no-memory control and GPT-2 at context 64 / 256, same data. M = 16
    # and the selective update won a probe (300 steps, seed 0) on validation blocks 40-80, which the report does
    # not score: held-out 5.181 nats/token, against 5.228 (M = 8 selective), 5.343 (M = 16 replace), 5.389 (M = 8
    # replace). Measured at 1 thread: 0.09 / 0.11 s/step for GPT-2 64 / 256, 0.10 for the segment model, 0.08 for
    # its control: 3 seeds x 1,200 steps ~ 25 min on a quiet core. The seed's K = 1 step (0.64 s/step, 7x the
    # others, ~40 min for 3 seeds) trains after all the other runs (`one_token_seeds`: how many seeds it gets), so
    # a run cut short keeps every other (model, seed). `position`: loss by position in the validation documents of
    # >= 2,048 tokens (5 of the split's 24 at this tokenizer).
    "segments": {
        **_CPU,
        "steps": 1200,
        "eval_every": 100,
        "one_token_seeds": 3,
        "norebias_control": False,
        "ablation_state_sizes": [],
        "segment": {"segment_length": 64, "block": 256, "state_size": 16, **SELECTIVE},
        # the write target at the memory benchmark's weight (not tuned here); a model choice, so adding it keeps the
        # other models' saved records
        "segment_write_loss": 5.0,
        "position": {"doc_tokens": 2048, "buckets": [0, 64, 256, 1024, 2048], "resolution": 64},
    },
    "gpu": {
        "corpus": "stdlib-docs",
        "train_chars": None,
        "val_chars": 400_000,
        "tokenizer": 4096,
        "arch": {"n_embd": 384, "n_layer": 6, "n_head": 6},
        "tokens_per_step": 8192,
        "steps": 600,
        "gptb_block": 128,
        "eval_block": 256,
        "eval_blocks": 200,
        "eval_every": 100,
        "eval_batch": 50,
        "train": {"lr": 1e-3, "weight_decay": 0.1},
        "state_size": 8,
        "ablation_state_sizes": [1, 32],
        "gpt2_contexts": [64, 256],
        "position": {"doc_tokens": 2048, "buckets": [0, 64, 256, 1024, 2048], "resolution": 128},
    },
    "mini": {
        "corpus": "stdlib-docs",
        "train_chars": 40_000,
        "val_chars": 6_000,
        "tokenizer": "byte",
        "arch": {"n_embd": 32, "n_layer": 1, "n_head": 2},
        "tokens_per_step": 128,
        "steps": 3,
        "gptb_block": 16,
        "eval_block": 32,
        "eval_blocks": 4,
        "eval_every": 2,
        "eval_batch": 4,
        "train": {"lr": 3e-3, "weight_decay": 0.1},
        "state_size": 2,
        "ablation_state_sizes": [1],
        "gpt2_contexts": [16, 32],
        "gptb_variants": {"gptb_selective": SELECTIVE},
        "segment": {"segment_length": 8, "block": 32, "state_size": 2},
        "position": {"doc_tokens": 32, "buckets": [0, 8, 16, 32], "resolution": 8},
    },
}
# Preset keys that only choose which models run: a finished (model, seed) record stays valid when they change.
_MODEL_CHOICE = ("one_token", "one_token_seeds", "gptb_variants", "gpt2_contexts", "ablation_state_sizes")
_MODEL_CHOICE += ("norebias_control", "segment_write_loss")


def variants(p: dict) -> dict[str, dict]:
    """name -> how to build and train it: kind, block length, GPTB overrides, context (None: the whole block) and
    the stride of the position evaluation's windows (GPT-2: half its context; None: windows do not overlap).

    A preset's `segment` (`segment_length` K, `block`, GPTB overrides) adds `gptb_segK`, trained on blocks of
    `block` tokens (the state carried across their segments), and its no-memory control `gptb_segK_nomem`: the same
    model trained and evaluated on rows of K tokens, so every segment starts from the initial state; with
    `segment_write_loss`, `gptb_segK_write`, `gptb_segK` with that write target weight. `one_token`
    (default True) keeps the seed's `gptb`, `norebias_control` (default True) its control `gptb_norebias`.
    """

    def gptb(block=p["gptb_block"], context=None, **overrides) -> dict:
        overrides = {"state_size": p["state_size"], **overrides}
        return {"kind": "gptb", "block": block, "context": context, "stride": None, "overrides": overrides}

    out = {"gptb": gptb()} if p.get("one_token", True) else {}
    if "segment" in p:
        segment = dict(p["segment"])
        block, k = segment.pop("block"), segment["segment_length"]
        if block <= k or block % k:
            raise ValueError(f"segment block must be a multiple of segment_length {k} above it, got {block}")
        out[f"gptb_seg{k}"] = gptb(block=block, **segment)
        out[f"gptb_seg{k}_nomem"] = gptb(block=k, context=k, **segment)
        if p.get("segment_write_loss"):  # the same with the write target (docs/design.md#the-write-target)
            out[f"gptb_seg{k}_write"] = gptb(block=block, **segment, state_write_loss=p["segment_write_loss"])
    for name, overrides in p.get("gptb_variants", {}).items():
        out[name] = gptb(**overrides)
    for ctx in p["gpt2_contexts"]:
        out[f"gpt2_ctx{ctx}"] = {"kind": "gpt2", "block": ctx, "context": ctx, "stride": max(1, ctx // 2)}
    for m in p["ablation_state_sizes"]:
        out[f"gptb_M{m}"] = gptb(state_size=m)
    if p.get("norebias_control", True):
        out["gptb_norebias"] = gptb(rebias=False)
    return out


def long_documents(texts: list[str], tokenizer, length: int) -> torch.Tensor:
    """Rows (D, length + 1) of the documents with at least `length` tokens: the separator (eos, which precedes
    every document in the training stream), then the document's first `length` tokens, so target p is its token p.
    """
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    rows = [[tokenizer.eos_token_id, *doc[:length]] for doc in ids if len(doc) >= length]
    if not rows:
        longest = max(map(len, ids), default=0)
        raise ValueError(
            f"no validation document has the position evaluation's {length} tokens (the longest has {longest}); "
            "lower position.doc_tokens or give more validation text"
        )
    return torch.tensor(rows, dtype=torch.long)


def position_losses(model, docs: torch.Tensor, position: dict, batch_size: int, context, stride) -> dict:
    """Mean held-out loss per position bucket and per `resolution` tokens of `docs` (see the module docstring for
    how each model reads a document: `context`/`stride` as in `common.window_logits`)."""
    losses = common.per_token_losses(model, docs, batch_size, context=context, stride=stride)
    fine = list(range(0, losses.shape[1], position["resolution"])) + [losses.shape[1]]
    return {
        "position_loss": common.bucket_means(losses, position["buckets"]),
        "position_curve": common.bucket_means(losses, fine),
    }


def run(preset: str, seeds: list[int], out: Path) -> dict:
    p = PRESETS[preset]
    header = common.start_run(NAME, preset, p, seeds)
    train_texts = common.load_texts(p["corpus"], "train", p["train_chars"])
    val_texts = common.load_texts(p["corpus"], "validation", p["val_chars"])
    tokenizer = common.make_tokenizer(p["tokenizer"], train_texts)
    train_stream = common.token_stream(train_texts, tokenizer)
    val_blocks = common.blocks_of(common.token_stream(val_texts, tokenizer), p["eval_block"], p["eval_blocks"])
    byte_lengths = common.token_byte_lengths(tokenizer)
    specs = variants(p)
    position = p.get("position")
    docs = long_documents(val_texts, tokenizer, position["doc_tokens"]) if position else None

    # a model's records are stamped with the shared settings and its own spec, so adding a model keeps the others'
    shared = {k: v for k, v in p.items() if k not in _MODEL_CHOICE}
    finished = {name: common.FinishedRuns(out, header, {**shared, "model": spec}) for name, spec in specs.items()}
    runs: dict[str, list[dict]] = {name: [] for name in specs}
    jobs = [(seed, name) for seed in seeds for name in specs]
    if "one_token_seeds" in p and "gptb" in specs:  # the slow one-token model: its few seeds after all the others
        jobs = [job for job in jobs if job[1] != "gptb"] + [(seed, "gptb") for seed in seeds[: p["one_token_seeds"]]]
    for seed, name in jobs:
        spec = specs[name]
        if (record := finished[name].get(name, seed)) is not None:
            runs[name].append(record)
            continue
        common.set_seed(seed)
        if spec["kind"] == "gptb":
            model = common.gptb_model(tokenizer, p["arch"], **spec["overrides"])
            flops = common.train_flops_per_token(model, "gptb")  # a no-memory control still runs its writes
        else:
            model = common.gpt2_model(tokenizer, p["arch"], spec["context"])
            flops = common.train_flops_per_token(model, "gpt2", spec["context"])
        context = spec["context"]

        def evaluate(model=model, context=context):
            losses = common.per_token_losses(model, val_blocks, p["eval_batch"], context=context)
            return common.loss_metrics(losses, val_blocks, byte_lengths)

        batches = common.BatchStream(train_stream, p["tokens_per_step"], seed)
        history = common.train_model(
            model,
            batches,
            spec["block"],
            p["steps"],
            p["train"],
            evaluate=evaluate,
            eval_every=p["eval_every"],
            desc=f"{name} seed {seed}",
        )
        record = {
            "seed": seed,
            "params": sum(t.numel() for t in model.parameters()),
            "train_flops_per_token": flops,
            "eval_tokens": history["eval_tokens"],
            "eval_flops": [t * flops for t in history["eval_tokens"]],
            "eval_loss": [e["loss"] for e in history["eval"]],
            "eval_bpb": [e["bpb"] for e in history["eval"]],
            "train_loss": history["train_loss"],
            "sec_per_step": history["sec_per_step"],
        }
        if position:
            record.update(position_losses(model, docs, position, p["eval_batch"], context, spec["stride"]))
        runs[name].append(finished[name].save(name, seed, record))

    summary = {}
    for name, seed_runs in runs.items():
        finals = [
            {"final_loss": r["eval_loss"][-1], "final_bpb": r["eval_bpb"][-1], "sec_per_step": r["sec_per_step"]}
            for r in seed_runs
        ]
        summary[name] = {
            **common.summarize(finals, ("final_loss", "final_bpb", "sec_per_step")),
            "seeds": len(seed_runs),
            "params": seed_runs[0]["params"],
            "train_flops_per_token": seed_runs[0]["train_flops_per_token"],
        }
    return common.finish_run(
        header,
        out,
        _plots,
        _report,
        vocab_size=len(tokenizer),
        train_tokens_available=len(train_stream),
        eval_targets=int(val_blocks[:, 1:].numel()),
        position_documents={"used": len(docs), "of": len(val_texts)} if position else None,
        runs=runs,
        summary=summary,
    )


def _plots(result: dict, out: Path) -> None:
    plt = common.pyplot()
    runs = result["runs"]
    main = _main_models(runs)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in main:
        r = runs[name]
        common.shaded(axes[0], r[0]["eval_tokens"], [x["eval_loss"] for x in r], name, marker="o")
        # from the first evaluation after step 0: zero FLOPs has no place on the log axis
        common.shaded(axes[1], r[0]["eval_flops"][1:], [x["eval_loss"][1:] for x in r], name, marker="o")
        common.shaded(axes[2], r[0]["eval_tokens"], [x["eval_bpb"] for x in r], name, marker="o")
    axes[0].set(xlabel="training tokens seen (tokens)", ylabel="held-out loss (nats / token)", title="Loss vs data")
    axes[1].set(xlabel="training compute (FLOPs, analytic; log scale, step 0 not shown)")
    axes[1].set(ylabel="held-out loss (nats / token)", xscale="log")  # models 7x apart in FLOPs/token stay readable
    axes[1].set_title("Loss vs compute")
    axes[2].set(xlabel="training tokens seen (tokens)", ylabel="held-out (bits / byte)", title="Bits per byte")
    common.finish_axes(*axes)
    common.save_figure(fig, out / "curves.png", f"GPTB vs GPT-2 (mean ± 1 s.d. over {len(result['seeds'])} seed(s))")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ablations = [n for n in runs if n.startswith("gptb")]
    for name in ablations:
        r = runs[name]
        common.shaded(axes[0], r[0]["eval_tokens"], [x["eval_loss"] for x in r], name, marker="o")
    axes[0].set(xlabel="training tokens seen (tokens)", ylabel="held-out loss (nats / token)", title="Ablations")
    common.finish_axes(axes[0])
    names = list(result["summary"])
    common.bars(
        axes[1],
        names,
        result["summary"],
        "final_bpb",
        "final held-out (bits / byte)",
        "Final held-out bits/byte (± 1 s.d.)",
    )
    axes[1].tick_params(axis="x", rotation=30)
    common.save_figure(fig, out / "ablations.png")
    if result.get("position_documents"):
        _position_plot(result, out)


def _against_control(runs: dict) -> str:
    """Each GPTB's final held-out loss minus the control's, paired by seed (mean ± s.d. over seeds)."""
    control = {r["seed"]: r["eval_loss"][-1] for r in runs.get("gptb_norebias", [])}
    lines = []
    for name, records in runs.items():
        if not name.startswith("gptb") or name == "gptb_norebias" or not control:
            continue
        diffs = [r["eval_loss"][-1] - control[r["seed"]] for r in records if r["seed"] in control]
        lower = sum(d < 0 for d in diffs)
        lines.append(
            f"- `{name}` minus the control `gptb_norebias`: {common.fmt(*common.mean_std(diffs))} "
            f"nats/token (paired by seed; lower in {lower}/{len(diffs)} seeds)"
        )
    return "\n".join(lines)


def _paired_gaps(runs: dict, name: str, reference: str, key: str = "eval_loss") -> list[tuple[float, float, int, int]]:
    """At every evaluation (or position bucket: `key`): `name`'s held-out loss minus `reference`'s, paired by seed
    (mean, s.d., seeds where `name` is lower, seeds)."""
    ref = {r["seed"]: r[key] for r in runs[reference]}
    pairs = [(r[key], ref[r["seed"]]) for r in runs[name] if r["seed"] in ref]
    gaps = []
    for i in range(len(runs[name][0][key])):
        diffs = [a[i] - b[i] for a, b in pairs]
        gaps.append((*common.mean_std(diffs), sum(d < 0 for d in diffs), len(diffs)))
    return gaps


def _no_memory_control(name: str, names) -> str | None:
    """The no-memory control of segment GPTB `name` (`gptb_segK`, or `gptb_segK_write` with the write target)."""
    control = f"{name.removesuffix('_write')}_nomem"
    return control if name.startswith("gptb_seg") and name != control and control in names else None


def _segment_section(result: dict) -> str:
    """Segment GPTB against its no-memory control and GPT-2 at context 64 at every evaluation, paired by seed."""
    runs, s = result["runs"], result["summary"]
    names = [n for n in runs if _no_memory_control(n, runs)]
    gpt2 = sorted((n for n in runs if n.startswith("gpt2_ctx")), key=lambda n: int(n.removeprefix("gpt2_ctx")))
    sections = []
    for name in names:
        control = _no_memory_control(name, runs)
        pairs = [(name, control)] + [(name, g) for g in gpt2[:1]] + [(g, gpt2[0]) for g in gpt2[1:]]
        pairs += [("gptb", gpt2[0])] if "gptb" in runs else []  # the seed's one-token step, where it ran
        gaps = {pair: _paired_gaps(runs, *pair) for pair in pairs}
        header = ["training tokens"] + [f"`{a}` − `{b}`" for a, b in pairs]
        rows = [
            [f"{tokens:,}"]
            + [f"{common.fmt(*gaps[pair][i][:2])} ({gaps[pair][i][2]}/{gaps[pair][i][3]})" for pair in pairs]
            for i, tokens in enumerate(runs[name][0]["eval_tokens"])
        ]
        finals = {r["seed"]: r["eval_loss"][-1] for r in runs[control]}
        per_seed = ", ".join(f"seed {r['seed']}: {r['eval_loss'][-1] - finals[r['seed']]:+.4f}" for r in runs[name])
        flops = [f"`{g}` {s[name]['train_flops_per_token'] / s[g]['train_flops_per_token']:.2f}x" for g in gpt2]
        sections.append(
            f"### `{name}`\n\nHeld-out nats/token differences at every evaluation, paired by seed: mean ± s.d. "
            "(seeds where the first is lower). Negative: the first model is better.\n\n"
            + common.markdown_table(header, rows)
            + f"\n\nFinal gap to the no-memory control `{control}` by seed: {per_seed}.  \n"
            f"Training FLOPs per token of `{name}` against GPT-2: {', '.join(flops)}."
        )
    return "## Segments: memory against no memory and against attention\n\n" + "\n\n".join(sections) if names else ""


def _main_models(runs: dict) -> list[str]:
    return [n for n in runs if n == "gptb" or n.startswith(("gpt2", "gptb_seg"))]


def _bucket_labels(edges: list[int]) -> list[str]:
    return [f"{a:,}–{b:,}" for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _position_plot(result: dict, out: Path) -> None:
    """positions.png: held-out loss per position bucket and per `resolution` tokens (mean ± s.d. over seeds)."""
    plt = common.pyplot()
    runs, position = result["runs"], result["config"]["position"]
    names = [n for n in _main_models(runs) if "position_loss" in runs[n][0]]
    edges, labels = position["buckets"], _bucket_labels(position["buckets"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for offset, name in enumerate(names):
        y = np.asarray([r["position_loss"] for r in runs[name]])
        std = y.std(axis=0, ddof=1) if len(y) > 1 else np.zeros(y.shape[1])
        x = np.arange(len(labels)) + 0.06 * (offset - (len(names) - 1) / 2)  # side by side, not on top
        axes[0].errorbar(x, y.mean(axis=0), yerr=std, marker="o", capsize=3, label=f"{name} (n = {len(y)})")
        curves = [r["position_curve"] for r in runs[name]]
        starts = np.arange(len(curves[0])) * position["resolution"]
        common.shaded(axes[1], starts + position["resolution"] / 2, curves, name, marker=".")
    axes[0].set_xticks(range(len(labels)), labels)
    axes[0].set(xlabel="position in the document (tokens)", ylabel="held-out loss (nats / token)")
    axes[0].set_title("Mean loss per position bucket")
    axes[1].set(xlabel="position in the document (tokens)", ylabel="held-out loss (nats / token)")
    axes[1].set_title(f"Mean loss per {position['resolution']} positions")
    common.finish_axes(*axes)
    docs = result["position_documents"]
    common.save_figure(
        fig,
        out / "positions.png",
        f"Loss by position: {docs['used']} validation documents of >= {edges[-1]:,} tokens (mean ± 1 s.d. over seeds)",
    )


def _position_section(result: dict) -> str:
    """Loss per position bucket for every model, and segment GPTB's gaps to its control and GPT-2, paired by seed."""
    runs, position, docs = result["runs"], result["config"]["position"], result["position_documents"]
    names = [n for n in runs if "position_loss" in runs[n][0]]
    edges, labels = position["buckets"], _bucket_labels(position["buckets"])
    rows = []
    for name in names:
        values = np.asarray([r["position_loss"] for r in runs[name]])
        rows.append([name, len(values)] + [common.fmt(*common.mean_std(v)) for v in values.T])
    targets = [(b - a) * docs["used"] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    text = (
        f"## Loss by position in long documents\n\nThe {docs['used']} validation documents (of the "
        f"{docs['of']} loaded) with at least {edges[-1]:,} tokens, each cut to its first {edges[-1]:,} tokens after "
        "the document separator; targets per bucket: " + ", ".join(f"{n:,}" for n in targets) + ". GPTB reads each "
        "document in one pass, carrying its state; its no-memory control one segment at a time, each from the "
        "initial state; GPT-2 at context C in windows of C tokens starting every C/2 tokens (a target at position "
        "p < C sees the whole prefix, later ones the last C/2 + 1 to C tokens). Held-out nats/token, mean ± s.d. "
        "over seeds.\n\n" + common.markdown_table(["model", "seeds", *labels], rows)
    )
    gpt2 = sorted((n for n in names if n.startswith("gpt2_ctx")), key=lambda n: int(n.removeprefix("gpt2_ctx")))
    for name in (n for n in names if _no_memory_control(n, names)):
        pairs = [(name, _no_memory_control(name, names)), *((name, g) for g in gpt2)]
        gaps = {pair: _paired_gaps(runs, *pair, key="position_loss") for pair in pairs}
        rows = [
            [f"`{a}` − `{b}`"] + [f"{common.fmt(m, sd)} ({lower}/{n})" for m, sd, lower, n in gaps[(a, b)]]
            for a, b in pairs
        ]
        text += (
            f"\n\nPaired by seed (seeds where `{name}` is lower); negative: `{name}` is better at those positions."
            "\n\n" + common.markdown_table(["difference", *labels], rows)
        )
    return text + "\n\n![positions](positions.png)"


def _report(result: dict, out: Path) -> None:
    s = result["summary"]
    rows = [
        [
            name,
            v["seeds"],
            f"{v['params']:,}",
            common.fmt(v["final_loss_mean"], v["final_loss_std"]),
            common.fmt(v["final_bpb_mean"], v["final_bpb_std"]),
            f"{v['train_flops_per_token']:.3g}",
            f"{v['sec_per_step_mean']:.3f}",
        ]
        for name, v in s.items()
    ]
    table = common.markdown_table(
        ["model", "seeds", "parameters", "held-out nats/token", "held-out bits/byte", "train FLOPs/token", "s/step"],
        rows,
    )
    best_gpt2 = min((n for n in s if n.startswith("gpt2")), key=lambda n: s[n]["final_loss_mean"])
    gptbs = [n for n in _main_models(s) if n.startswith("gptb") and not n.endswith("_nomem")]
    verdict = " ".join(
        f"At equal tokens, `{g}` ({s[g]['seeds']} seed(s)) ends "
        f"{'below' if s[g]['final_loss_mean'] < s[best_gpt2]['final_loss_mean'] else 'above'} the better GPT-2 "
        f"({best_gpt2}) by {abs(s[g]['final_loss_mean'] - s[best_gpt2]['final_loss_mean']):.3f} nats/token; it costs "
        f"{s[g]['train_flops_per_token'] / s[best_gpt2]['train_flops_per_token']:.2f}x its training FLOPs per token."
        for g in gptbs
    )
    control_note = (
        " `gptb_norebias` is the control the design predicts cannot use its state." if "gptb_norebias" in s else ""
    )
    p = result["config"]
    common.experiment_report(
        out,
        "Sample efficiency: GPTB vs GPT-2",
        result,
        [
            f"Budget: {p['steps']} steps x {p['tokens_per_step']} tokens = {p['steps'] * p['tokens_per_step']:,} "
            f"training tokens (of {result['train_tokens_available']:,} available); vocabulary "
            f"{result['vocab_size']}; held-out: {result['eval_targets']:,} target tokens of `{p['corpus']}` "
            f"validation in blocks of {p['eval_block']}.",
            "## Final held-out loss (mean ± s.d. over seeds)\n\n" + table,
            "## Reading\n\n" + verdict + control_note + "\n\n" + _against_control(result["runs"]),
            _segment_section(result),
            _position_section(result) if result.get("position_documents") else "",
            "![curves](curves.png)\n\n![ablations](ablations.png)",
        ],
    )
