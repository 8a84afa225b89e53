"""Continual learning: does the ART memory curb forgetting of domain A while training on domain B?

GPTB is trained on A (`stdlib-docs`) for `steps_a` steps, then on B (`python-code`) for `steps_b` steps with a
fresh optimiser and the same schedule (warm-up, cosine). Methods (the same settings in both phases):

- `plain`: no ART memory: ordinary fine-tuning;
- `gate`: ART novelty gate: sequences that resonate with a known category weigh `art_resonated_weight` (0.1) in
  the loss, new ones 1;
- `coupled`: ART coupled loss, `art_loss_weight` 0.1 (the pooled representation is pulled toward its category);
- `both`: gate and coupled loss.

Held-out loss (nats/token) on A and on B is measured through both phases. Forgetting = loss on A after B - loss on
A after A. The tokenizer (byte-level BPE) is trained on A and B together so neither domain is disadvantaged.

Time, default `cpu` preset on 2 shared CPU cores (OMP_NUM_THREADS=1), from step times measured with these
settings (width 128, depth 2, M=8, vocabulary 1024, 1024 tokens/step): 0.41-0.44 s/step with or without ART;
evaluation (2 domains x 40 blocks of 64 tokens) ~0.6 s, 12 times per run. 4 methods x 3 seeds x (160 + 160)
steps: 12 x (320 x 0.43 + 7) ≈ 1730 s ≈ 29 minutes. Shared machines drift by +-30%. `mini`: seconds.
"""

from __future__ import annotations

from pathlib import Path

from . import common

NAME = "continual"

METHODS = {
    "plain": {},
    "gate": {"art_enabled": True, "art_resonated_weight": 0.1},
    "coupled": {"art_enabled": True, "art_loss_weight": 0.1},
    "both": {"art_enabled": True, "art_resonated_weight": 0.1, "art_loss_weight": 0.1},
}

PRESETS = {
    "cpu": {
        "domain_a": "stdlib-docs",
        "domain_b": "python-code",
        "train_chars": 1_000_000,
        "val_chars": 100_000,
        "tokenizer": 1024,
        "arch": {"n_embd": 128, "n_layer": 2, "n_head": 4},
        "state_size": 8,
        "art": {"art_vigilance": 0.9, "art_max_categories": 512},
        "tokens_per_step": 1024,
        "block": 64,
        "steps_a": 160,
        "steps_b": 160,
        "eval_every": 32,
        "eval_blocks": 40,
        "eval_batch": 40,
        "train": {"lr": 2e-3, "weight_decay": 0.1},
    },
    "gpu": {
        "domain_a": "stdlib-docs",
        "domain_b": "python-code",
        "train_chars": None,
        "val_chars": 400_000,
        "tokenizer": 4096,
        "arch": {"n_embd": 384, "n_layer": 6, "n_head": 6},
        "state_size": 8,
        "art": {"art_vigilance": 0.9, "art_max_categories": 2048},
        "tokens_per_step": 8192,
        "block": 128,
        "steps_a": 500,
        "steps_b": 500,
        "eval_every": 100,
        "eval_blocks": 200,
        "eval_batch": 100,
        "train": {"lr": 1e-3, "weight_decay": 0.1},
    },
    "mini": {
        "domain_a": "stdlib-docs",
        "domain_b": "python-code",
        "train_chars": 20_000,
        "val_chars": 4_000,
        "tokenizer": "byte",
        "arch": {"n_embd": 32, "n_layer": 1, "n_head": 2},
        "state_size": 2,
        "art": {"art_vigilance": 0.9, "art_max_categories": 64},
        "tokens_per_step": 128,
        "block": 16,
        "steps_a": 2,
        "steps_b": 2,
        "eval_every": 1,
        "eval_blocks": 4,
        "eval_batch": 4,
        "train": {"lr": 3e-3, "weight_decay": 0.1},
    },
}


def run(preset: str, seeds: list[int], out: Path) -> dict:
    p = PRESETS[preset]
    header = common.start_run(NAME, preset, p, seeds)
    texts = {d: common.load_texts(d, "train", p["train_chars"]) for d in (p["domain_a"], p["domain_b"])}
    tokenizer = common.make_tokenizer(p["tokenizer"], [t for v in texts.values() for t in v])
    streams = {d: common.token_stream(v, tokenizer) for d, v in texts.items()}
    val = {
        d: common.blocks_of(
            common.token_stream(common.load_texts(d, "validation", p["val_chars"]), tokenizer),
            p["block"],
            p["eval_blocks"],
        )
        for d in texts
    }
    byte_lengths = common.token_byte_lengths(tokenizer)
    a, b = p["domain_a"], p["domain_b"]

    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    finished = common.FinishedRuns(out, header)
    for seed in seeds:
        for method, overrides in METHODS.items():
            if (record := finished.get(method, seed)) is not None:
                runs[method].append(record)
                continue
            common.set_seed(seed)
            extra = {**p["art"], **overrides} if overrides.get("art_enabled") else {}
            model = common.gptb_model(tokenizer, p["arch"], state_size=p["state_size"], **extra)

            def evaluate(model=model):
                return {
                    d: common.loss_metrics(common.per_token_losses(model, v, p["eval_batch"]), v, byte_lengths)
                    for d, v in val.items()
                }

            phases = {}
            for phase, domain, steps in (("A", a, p["steps_a"]), ("B", b, p["steps_b"])):
                batches = common.BatchStream(streams[domain], p["tokens_per_step"], seed)
                phases[phase] = common.train_model(
                    model,
                    batches,
                    p["block"],
                    steps,
                    p["train"],
                    evaluate=evaluate,
                    eval_every=p["eval_every"],
                    desc=f"{method} seed {seed} phase {phase}",
                )
            ha, hb = phases["A"], phases["B"]
            curve_steps = ha["eval_step"] + [p["steps_a"] + s for s in hb["eval_step"][1:]]
            curve = ha["eval"] + hb["eval"][1:]
            runs[method].append(
                finished.save(
                    method,
                    seed,
                    {
                        "seed": seed,
                        "eval_step": curve_steps,
                        "loss_a": [e[a]["loss"] for e in curve],
                        "loss_b": [e[b]["loss"] for e in curve],
                        "a_after_a": ha["eval"][-1][a]["loss"],
                        "b_after_a": ha["eval"][-1][b]["loss"],
                        "a_after_b": hb["eval"][-1][a]["loss"],
                        "b_after_b": hb["eval"][-1][b]["loss"],
                        "forgetting": hb["eval"][-1][a]["loss"] - ha["eval"][-1][a]["loss"],
                        "art_categories": model.art_memory.num_categories if model.art_memory is not None else 0,
                        "sec_per_step": (ha["seconds"] + hb["seconds"]) / (p["steps_a"] + p["steps_b"]),
                    },
                )
            )

    keys = ("a_after_a", "a_after_b", "forgetting", "b_after_a", "b_after_b")
    summary = {m: common.summarize(rs, keys) for m, rs in runs.items()}
    return common.finish_run(
        header,
        out,
        _plots,
        _report,
        methods=METHODS,
        vocab_size=len(tokenizer),
        runs=runs,
        summary=summary,
    )


def _plots(result: dict, out: Path) -> None:
    plt = common.pyplot()
    p = result["config"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for method, rs in result["runs"].items():
        x = rs[0]["eval_step"]
        common.shaded(axes[0], x, [r["loss_a"] for r in rs], method, marker="o")
        common.shaded(axes[1], x, [r["loss_b"] for r in rs], method, marker="o")
    for ax, domain in zip(axes[:2], (p["domain_a"], p["domain_b"]), strict=True):
        ax.axvline(p["steps_a"], color="k", linestyle=":", linewidth=1)
        ax.set(
            xlabel=f"optimizer step ({p['tokens_per_step']} tokens each; A then B after the dotted line)",
            ylabel=f"held-out loss on {domain} (nats / token)",
            title=f"Loss on {domain}",
        )
    common.finish_axes(*axes[:2])
    common.bars(
        axes[2],
        list(result["summary"]),
        result["summary"],
        "forgetting",
        "forgetting: loss on A after B - after A (nats / token)",
        "Forgetting (lower is better)",
    )
    title = f"Continual learning, mean ± 1 s.d. over {len(result['seeds'])} seed(s)"
    common.save_figure(fig, out / "continual.png", title)


def _report(result: dict, out: Path) -> None:
    p = result["config"]
    s = result["summary"]
    rows = [
        [
            m,
            common.fmt(v["a_after_a_mean"], v["a_after_a_std"]),
            common.fmt(v["a_after_b_mean"], v["a_after_b_std"]),
            common.fmt(v["forgetting_mean"], v["forgetting_std"]),
            common.fmt(v["b_after_b_mean"], v["b_after_b_std"]),
        ]
        for m, v in s.items()
    ]
    table = common.markdown_table(
        ["method", "loss A after A", "loss A after B", "forgetting (A)", "loss B after B"], rows
    )
    plain = s["plain"]
    lines = []
    for m in s:
        if m == "plain":
            continue
        lines.append(
            f"- `{m}`: forgetting {s[m]['forgetting_mean'] - plain['forgetting_mean']:+.3f}, loss on B "
            f"{s[m]['b_after_b_mean'] - plain['b_after_b_mean']:+.3f} nats/token vs plain."
        )
    common.experiment_report(
        out,
        "Continual learning: forgetting with and without the ART memory",
        result,
        [
            f"A = `{p['domain_a']}` for {p['steps_a']} steps, then B = `{p['domain_b']}` for {p['steps_b']} steps "
            f"({p['tokens_per_step']} tokens/step). Methods: `{result['methods']}`.",
            "## Held-out loss, nats/token (mean ± s.d. over seeds)\n\n" + table,
            "## Reading (differences from plain fine-tuning; negative is better)\n\n" + "\n".join(lines),
            "![continual](continual.png)",
        ],
    )
