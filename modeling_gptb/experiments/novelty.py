"""Novelty detection: does the ART memory tell held-out text of the training domain from other domains?

GPTB with ART enabled (cosine rule) is trained on domain A (`stdlib-docs`: docstring prose); the memory learns
from the pooled representation of every training sequence. Then held-out blocks of A (in-domain, negatives) and
of the other domains (`python-code`, `system-docs`; novel, positives) are scored by:

- `art_novelty`: 1 - best cosine similarity to the memory's prototypes, as learnt during training (read only);
- `art_refit`: the same with a fresh memory fed the final model's embeddings of the training sample (the
  prototypes learnt during training describe earlier versions of the representation);
- `nn_cosine` (baseline): 1 - cosine similarity to the nearest training embedding (same pooled embeddings,
  `train_reference_blocks` training blocks);
- `loss` (baseline): the model's own mean per-token loss on the block.

Metrics: AUROC (novel = positive; Mann-Whitney with ties counted half, `common.auroc`) and FPR at 95% TPR (share
of in-domain blocks flagged at the threshold that flags 95% of novel ones, `common.fpr_at_tpr`). The tokenizer is
trained on A only, as a domain-A model's would be; that favours the loss baseline on code.

Time, default `cpu` preset on 2 shared CPU cores (OMP_NUM_THREADS=1), from step times measured with this preset
(width 128, depth 2, M=8, ART on, vocabulary 1024, 1024 tokens/step): 0.41 s/step; scoring 300 blocks of 64 tokens
takes 2.3 s, so ~15 s per seed for the reference sample and three test domains. 1300 steps x 3 seeds:
3 x (1300 x 0.41 + 15) ≈ 1650 s ≈ 28 minutes (+ ~10 s corpora and tokenizer). Shared machines drift by +-30%.
`mini`: seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from modeling_gptb.art_memory import ARTMemory

from . import common

NAME = "novelty"
METHODS = ("art_novelty", "art_refit", "nn_cosine", "loss")

PRESETS = {
    "cpu": {
        "domain_a": "stdlib-docs",
        "other_domains": ["python-code", "system-docs"],
        "train_chars": 1_600_000,
        "val_chars": 200_000,
        "tokenizer": 1024,
        "arch": {"n_embd": 128, "n_layer": 2, "n_head": 4},
        "state_size": 8,
        "art": {"art_vigilance": 0.9, "art_max_categories": 512},
        "tokens_per_step": 1024,
        "block": 64,
        "steps": 1300,
        "train": {"lr": 2e-3, "weight_decay": 0.1},
        "train_reference_blocks": 1000,
        "test_blocks": 300,
        "eval_batch": 50,
    },
    "gpu": {
        "domain_a": "stdlib-docs",
        "other_domains": ["python-code", "system-docs"],
        "train_chars": None,
        "val_chars": 1_000_000,
        "tokenizer": 4096,
        "arch": {"n_embd": 384, "n_layer": 6, "n_head": 6},
        "state_size": 8,
        "art": {"art_vigilance": 0.9, "art_max_categories": 2048},
        "tokens_per_step": 8192,
        "block": 128,
        "steps": 1500,
        "train": {"lr": 1e-3, "weight_decay": 0.1},
        "train_reference_blocks": 5000,
        "test_blocks": 1000,
        "eval_batch": 200,
    },
    "mini": {
        "domain_a": "stdlib-docs",
        "other_domains": ["python-code", "system-docs"],
        "train_chars": 30_000,
        "val_chars": 4_000,
        "tokenizer": "byte",
        "arch": {"n_embd": 32, "n_layer": 1, "n_head": 2},
        "state_size": 2,
        "art": {"art_vigilance": 0.9, "art_max_categories": 64},
        "tokens_per_step": 128,
        "block": 16,
        "steps": 3,
        "train": {"lr": 3e-3, "weight_decay": 0.1},
        "train_reference_blocks": 32,
        "test_blocks": 16,
        "eval_batch": 16,
    },
}


def nn_cosine_distance(train: torch.Tensor, test: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """1 - max cosine similarity of each test row to any training row."""
    train_n = F.normalize(train.double(), dim=1)
    out = []
    for start in range(0, len(test), chunk):
        sims = F.normalize(test[start : start + chunk].double(), dim=1) @ train_n.T
        out.append(1.0 - sims.max(dim=1).values)
    return torch.cat(out).float()


def run(preset: str, seeds: list[int], out: Path) -> dict:
    p = PRESETS[preset]
    header = common.start_run(NAME, preset, p, seeds)
    train_texts = common.load_texts(p["domain_a"], "train", p["train_chars"])
    tokenizer = common.make_tokenizer(p["tokenizer"], train_texts)
    train_stream = common.token_stream(train_texts, tokenizer)
    reference = common.blocks_of(train_stream, p["block"])
    reference = reference[torch.randperm(len(reference), generator=torch.Generator().manual_seed(1234))]
    reference = reference[: p["train_reference_blocks"]]
    test = {
        domain: common.blocks_of(
            common.token_stream(common.load_texts(domain, "validation", p["val_chars"]), tokenizer),
            p["block"],
            p["test_blocks"],
        )
        for domain in [p["domain_a"], *p["other_domains"]]
    }

    per_seed = []
    finished = common.FinishedRuns(out, header)
    for seed in seeds:
        if (record := finished.get("gptb", seed)) is not None:
            per_seed.append(record)
            continue
        common.set_seed(seed)
        model = common.gptb_model(tokenizer, p["arch"], state_size=p["state_size"], art_enabled=True, **p["art"])
        batches = common.BatchStream(train_stream, p["tokens_per_step"], seed)
        history = common.train_model(model, batches, p["block"], p["steps"], p["train"], desc=f"train A seed {seed}")
        ref = common.embeddings(model, reference, p["eval_batch"])
        refit = ARTMemory(
            model.config.n_embd,
            rule=model.config.art_rule,
            vigilance=model.config.art_vigilance,
            max_categories=model.config.art_max_categories,
        ).to(ref["pooled"].device)
        refit.update(ref["pooled"].double().to(refit.weight.dtype))
        scores = {}
        for domain, blocks in test.items():
            e = common.embeddings(model, blocks, p["eval_batch"])
            scores[domain] = {
                "art_novelty": e["art_novelty"],
                "art_refit": refit.novelty(e["pooled"].to(refit.weight.dtype)).float(),
                "nn_cosine": nn_cosine_distance(ref["pooled"], e["pooled"]),
                "loss": e["loss"],
            }
        metrics = {}
        for domain in p["other_domains"]:
            metrics[domain] = {
                method: {
                    "auroc": common.auroc(scores[p["domain_a"]][method], scores[domain][method]),
                    "fpr95": common.fpr_at_tpr(scores[p["domain_a"]][method], scores[domain][method]),
                }
                for method in METHODS
            }
        per_seed.append(
            finished.save(
                "gptb",
                seed,
                {
                    "seed": seed,
                    "art_categories": model.art_memory.num_categories,
                    "art_refit_categories": refit.num_categories,
                    "final_train_loss": history["train_loss"][-1],
                    "sec_per_step": history["sec_per_step"],
                    "metrics": metrics,
                    "mean_scores": {d: {m: float(v.mean()) for m, v in s.items()} for d, s in scores.items()},
                    "scores": {d: {m: v.tolist() for m, v in s.items()} for d, s in scores.items()},
                },
            )
        )

    summary = {
        domain: {
            method: common.summarize([r["metrics"][domain][method] for r in per_seed], ("auroc", "fpr95"))
            for method in METHODS
        }
        for domain in p["other_domains"]
    }
    return common.finish_run(
        header, out, _plots, _report, vocab_size=len(tokenizer), per_seed=per_seed, summary=summary
    )


def _plots(result: dict, out: Path) -> None:
    plt = common.pyplot()
    p = result["config"]
    domains = p["other_domains"]
    first = result["per_seed"][0]["scores"]
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 5), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        for method in METHODS:
            fpr, tpr = common.roc_curve(first[p["domain_a"]][method], first[domain][method])
            auc = result["summary"][domain][method]["auroc_mean"]
            ax.plot(fpr, tpr, label=f"{method} (AUROC {auc:.3f})")
        ax.plot([0, 1], [0, 1], "k:", linewidth=1)
        ax.set(
            xlabel=f"false-positive rate (share of held-out {p['domain_a']} flagged)",
            ylabel=f"true-positive rate (share of {domain} flagged)",
            title=f"{p['domain_a']} (in) vs {domain} (novel), seed {result['seeds'][0]}",
        )
        common.finish_axes(ax, loc="lower right")
    common.save_figure(fig, out / "roc.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(domains)
    for i, domain in enumerate(domains):
        s = result["summary"][domain]
        xs = [j + i * width for j in range(len(METHODS))]
        for ax, metric in zip(axes, ("auroc", "fpr95"), strict=True):
            ax.bar(
                xs,
                [s[m][f"{metric}_mean"] for m in METHODS],
                width,
                yerr=[s[m][f"{metric}_std"] for m in METHODS],
                label=domain,
            )
    for ax, label in zip(axes, ("AUROC (1 = perfect, 0.5 = chance)", "FPR at 95% TPR (0 = perfect)"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METHODS))], METHODS)
        ax.set(ylabel=label, ylim=(0, 1.05))
        common.finish_axes(ax, grid_axis="y")
    common.save_figure(
        fig, out / "metrics.png", f"Novelty detection, mean ± 1 s.d. over {len(result['seeds'])} seed(s)"
    )


def _report(result: dict, out: Path) -> None:
    p = result["config"]
    rows = []
    for domain, methods in result["summary"].items():
        for method, v in methods.items():
            rows.append(
                [
                    domain,
                    method,
                    common.fmt(v["auroc_mean"], v["auroc_std"]),
                    common.fmt(v["fpr95_mean"], v["fpr95_std"]),
                ]
            )
    table = common.markdown_table(["novel domain", "score", "AUROC", "FPR@95%TPR"], rows)
    cats = [r["art_categories"] for r in result["per_seed"]]
    best = {
        domain: max(methods, key=lambda m: methods[m]["auroc_mean"]) for domain, methods in result["summary"].items()
    }
    common.experiment_report(
        out,
        "Novelty detection: ART memory vs baselines",
        result,
        [
            f"Trained on `{p['domain_a']}` for {p['steps']} steps x {p['tokens_per_step']} tokens; "
            f"held-out blocks of {p['block']} tokens, {p['test_blocks']} per domain; ART vigilance "
            f"{p['art']['art_vigilance']}, categories after training: {cats}.",
            "## Detection (mean ± s.d. over seeds; novel domain = positive class)\n\n" + table,
            "## Reading\n\nBest score per novel domain: "
            + ", ".join(f"{d}: `{m}`" for d, m in best.items())
            + ". ART wins only where its row beats both baselines.",
            "![roc](roc.png)\n\n![metrics](metrics.png)",
        ],
    )
