"""Novelty detection: does the ART memory tell held-out text of the training domain from other domains?

GPTB with ART enabled (cosine rule) is trained on domain A (`stdlib-docs`: docstring prose). Then held-out blocks of
A (in-domain, negatives) and of novel sets (positives) are scored. The novel sets: `python-code` (code vs prose),
`system-docs` (other English prose: the near domain), `german` (German man pages under /usr/share/man/de: another
language; left out, and said so, where the machine has none) and `random-chars` (random printable characters,
generated from the seed). Scores, each higher = more novel:

- `art_training`: the memory as learned during training (its prototypes describe earlier representations);
- `art[I]` for each input I of `INPUTS`: the pooling (`art_pooling`, `art_pool_layers`) and the input transform
  (docs/design.md#what-the-memory-sees): `mean` (today's input), `mean+center`, `mean+euclidean`, and the mean, spread
  and maximum of every layer (`all+...`) with the `euclidean` or the `standardize` transform; a memory fitted to the
  final model (`fit_input_transform` then `update` on `train_reference_blocks` training blocks), read only;
- `nn_cosine[I]` (baseline): 1 - cosine similarity to the nearest training block, on the same transformed embeddings
  (for `euclidean` close to the nearest Euclidean distance); `nn_l2`: the nearest Euclidean distance, raw;
- `loss` (baseline): the model's own mean per-token loss on the block;
- `combined`: the calibrated combined score of `art[all+standardize]` and the loss (docs/design.md#calibrated-verdict);
- `outlier_exposure` (Hendrycks et al. 2019, here a linear probe): `ARTMemory.fit_outlier_exposure`, a logistic
  regression on the detector's rows, training blocks (0) against blocks of languages and characters no test set uses
  (1: `outlier_languages` man pages, random characters of another seed); `art+outlier_exposure`: its z-score plus the
  memory's (means and standard deviations from the calibration blocks); `art+loss+outlier_exposure`: the library's
  calibrated `"outliers"` score, the z-scores of the memory, the loss and the probe (counted only above the in-domain
  mean) weighted by `OUTLIER_SCORE_WEIGHTS` (docs/design.md#outlier-exposure). The random-character test set is then
  no longer unseen in kind.

Held-out A is split in two: `calibration_blocks` blocks calibrate the verdict (5% false positives) and choose nothing
else; the rest, from other documents, are the test negatives. Every held-out set takes at most `blocks_per_document`
blocks from each document, so it spreads over many documents (the first 300 blocks of a corpus can be a handful of
long documents: study.md). The vigilance per transform was chosen on validation splits (a 400-step probe
of this setup, seed 0): the memory must stay well below capacity. Metrics: AUROC (novel = positive; Mann-Whitney with
ties counted half, `common.auroc`), FPR at 95% TPR (`common.fpr_at_tpr`), and at the calibrated 5% threshold the
share of held-out A flagged (false alarms) and of each novel set flagged. The tokenizer is trained on A only, as a
domain-A model's would be.

Time, default `cpu` preset on 2 shared CPU cores (OMP_NUM_THREADS=1): 300 steps at 0.4-0.7 s/step, plus ~30 s of
scoring: about 3-4 minutes per seed, 10-12 minutes for 3 seeds. `mini`: seconds.
"""

from __future__ import annotations

import copy
import random
import string
from pathlib import Path

import torch
import torch.nn.functional as F

from modeling_gptb.art_memory import ARTMemory
from modeling_gptb.data import SYSTEM_MAN_ROOT, _read_system_doc

from . import common

NAME = "novelty"
# What the fitted memories see (docs/design.md#what-the-memory-sees): name -> (art_pooling, art_pool_layers,
# input_transform). "mean" is today's input (the last layer's mean, untransformed).
INPUTS = {
    "mean": ("mean", "last", "none"),
    "mean+center": ("mean", "last", "center"),
    "mean+euclidean": ("mean", "last", "euclidean"),
    "all+euclidean": ("mean_std_max", "all", "euclidean"),
    "all+standardize": ("mean_std_max", "all", "standardize"),
}
COMBINED_INPUT = "all+standardize"  # the memory the combined verdict uses: the best input on the validation probe
METHODS = (
    "art_training",
    *(f"art[{name}]" for name in INPUTS),
    *(f"nn_cosine[{name}]" for name in INPUTS),
    "nn_l2",
    "loss",
    "combined",
    "outlier_exposure",
    "art+outlier_exposure",
    "art+loss+outlier_exposure",
)
GERMAN_ROOT = SYSTEM_MAN_ROOT / "de"

# Chosen on validation splits only (a probe of the cpu preset, seed 0, in-domain training documents past the
# training cap and novel blocks past the test blocks): high enough to tell the domains apart, low enough that the
# memory stays below capacity. all+standardize: the lowest vigilance at which the memory matches the nearest
# neighbour on the same rows (0.85 kept 3 categories and lost to it; study.md).
VIGILANCE = {"mean": 0.9, "mean+center": 0.9, "mean+euclidean": 0.95, "all+euclidean": 0.95, "all+standardize": 0.98}
# The learning rate where it is not the rule's default (0.5): for all+standardize 0.1 matched or beat 0.5 at
# vigilance 0.97-0.98, on the preset's model and on one trained 1,000 steps (study.md).
BETA = {"all+standardize": 0.1}
# Outlier exposure's languages: every man-page translation but German (a test set) that the validation probe had.
# Nine languages at 100 blocks each beat French + Spanish at 200 on the validation system docs (0.95 vs 0.89 alone;
# study.md). C headers as outliers changed nothing and are left out: code stays unseen in kind.
OUTLIER_LANGUAGES = ["fr", "es", "it", "pl", "sv", "nl", "pt_BR", "ru", "ja"]
PRESETS = {
    "cpu": {
        "domain_a": "stdlib-docs",
        "other_domains": ["python-code", "system-docs", "german", "random-chars"],
        "train_chars": 800_000,
        "val_chars": 2_000_000,
        "blocks_per_document": 16,
        "tokenizer": 1024,
        "arch": {"n_embd": 128, "n_layer": 2, "n_head": 4},
        "state_size": 8,
        "art": {"art_vigilance": 0.9, "art_max_categories": 512},
        "vigilance": VIGILANCE,
        "beta": BETA,
        "outlier_languages": OUTLIER_LANGUAGES,
        "outlier_blocks": 100,
        "fitted_max_categories": 1024,
        "lift": 4.0,
        "fpr": 0.05,
        "tokens_per_step": 1024,
        "block": 64,
        # tokens per scored text (held-out, reference and outlier blocks): 128 beat 64 and 256 on validation
        "text_tokens": 128,
        "steps": 300,
        "train": {"lr": 2e-3, "weight_decay": 0.1},
        "train_reference_blocks": 600,
        # in-domain calibration and test take 104 documents, before those the 128-token validation probe read
        "calibration_blocks": 200,
        "test_blocks": 400,  # per set, at most: the code validation split holds 364 blocks (26 modules)
        "eval_batch": 50,
    },
    "gpu": {
        "domain_a": "stdlib-docs",
        "other_domains": ["python-code", "system-docs", "german", "random-chars"],
        "train_chars": 1_000_000,  # of 1.59 M: the rest is held-out in-domain text (the validation split is 76 k)
        "val_chars": 4_000_000,
        "blocks_per_document": 32,
        "tokenizer": 4096,
        "arch": {"n_embd": 384, "n_layer": 6, "n_head": 6},
        "state_size": 8,
        "art": {"art_vigilance": 0.9, "art_max_categories": 2048},
        "vigilance": VIGILANCE,
        "beta": BETA,
        "outlier_languages": OUTLIER_LANGUAGES,
        "outlier_blocks": 500,
        "fitted_max_categories": 4096,
        "lift": 4.0,
        "fpr": 0.05,
        "tokens_per_step": 8192,
        "block": 128,
        "text_tokens": 128,
        "steps": 1500,
        "train": {"lr": 1e-3, "weight_decay": 0.1},
        "train_reference_blocks": 5000,
        "calibration_blocks": 300,
        "test_blocks": 600,
        "eval_batch": 200,
    },
    "mini": {
        "domain_a": "stdlib-docs",
        "other_domains": ["python-code", "random-chars"],
        "train_chars": 30_000,
        "val_chars": 8_000,
        "blocks_per_document": 4,
        "tokenizer": "byte",
        "arch": {"n_embd": 32, "n_layer": 1, "n_head": 2},
        "state_size": 2,
        "art": {"art_vigilance": 0.9, "art_max_categories": 64},
        "vigilance": VIGILANCE,
        "beta": BETA,
        "outlier_languages": ["fr"],
        "outlier_blocks": 8,
        "fitted_max_categories": 64,
        "lift": 4.0,
        "fpr": 0.05,
        "tokens_per_step": 128,
        "block": 16,
        "text_tokens": 16,
        "steps": 3,
        "train": {"lr": 3e-3, "weight_decay": 0.1},
        "train_reference_blocks": 32,
        "calibration_blocks": 16,
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


def nn_l2_distance(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """The Euclidean distance of each test row to the nearest training row."""
    return torch.cdist(test.double(), train.double()).min(dim=1).values.float()


def random_characters(chars: int, seed: int) -> list[str]:
    """Printable ASCII drawn uniformly (letters, digits, punctuation, spaces): text no domain resembles."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    "
    return ["".join(rng.choice(alphabet) for _ in range(chars))]


def man_pages(language: str, max_chars: int) -> list[str]:
    """The man pages of `language` on this machine (/usr/share/man/LANGUAGE), in path order; empty where none."""
    root, texts, total = SYSTEM_MAN_ROOT / language, [], 0
    for path in sorted(root.rglob("*")) if root.is_dir() else []:
        text = _read_system_doc(path) if path.is_file() else None
        if text:
            texts.append(text[: max_chars - total])
            total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


def german_texts(max_chars: int) -> list[str]:
    """German man pages of this machine (/usr/share/man/de), in path order; empty where there are none."""
    return man_pages("de", max_chars)


OUTLIER_RANDOM_SEED = 777  # not the random-character test set's 1234


def outlier_texts(p: dict) -> dict[str, list[str]]:
    """The outliers `outlier_exposure` is fitted against: other languages' man pages (never German, a test set) and
    random characters of another seed; a language the machine lacks is left out."""
    if "de" in p["outlier_languages"]:
        raise ValueError("German is a test set: it cannot be an outlier the score is fitted on")
    texts = {language: man_pages(language, p["val_chars"]) for language in p["outlier_languages"]}
    texts["random-chars"] = random_characters(p["val_chars"], seed=OUTLIER_RANDOM_SEED)
    return {name: t for name, t in texts.items() if t}


def held_out_blocks(texts: list[str], tokenizer, p: dict, limit: int, per_document="preset"):
    """Up to `limit` blocks of `p["text_tokens"]` tokens and the number of documents they come from: at most
    `per_document` (default: the preset's `blocks_per_document`) from each document in order, so a held-out set spreads
    over many documents rather than the first few long ones; `None`: the documents as one stream (every document
    counted)."""
    per_document = p["blocks_per_document"] if per_document == "preset" else per_document
    if per_document is None:
        return common.blocks_of(common.token_stream(texts, tokenizer), p["text_tokens"], limit), len(texts)
    parts, taken, used = [], 0, 0
    while used < len(texts) and taken < limit:
        ids = common.token_stream([texts[used]], tokenizer)
        used += 1
        if len(ids) >= p["text_tokens"]:
            parts.append(common.blocks_of(ids, p["text_tokens"], min(per_document, limit - taken)))
            taken += len(parts[-1])
    if not parts:
        raise ValueError(f"no document of these {len(texts)} holds a block of {p['text_tokens']} tokens")
    return torch.cat(parts), used


def in_domain_held_out_texts(p: dict) -> list[str]:
    """Domain A's documents the model never trains on: the validation split, then the training split's documents
    past the `train_chars` cap (the one cut at the cap left out; none when the whole split is trained on). The
    validation split alone holds too few documents for spread-out calibration and test sets."""
    texts = common.load_texts(p["domain_a"], "validation", p["val_chars"])
    if p["train_chars"] is None:
        return texts
    start = 0
    for text in common.load_texts(p["domain_a"], "train", p["train_chars"] + p["val_chars"]):
        if start >= p["train_chars"]:  # the same order as the training texts: this one starts past the cap
            texts.append(text)
        start += len(text)
    return texts


def novel_texts(domain: str, max_chars: int) -> list[str]:
    if domain == "random-chars":
        return random_characters(max_chars, seed=1234)
    if domain == "german":
        return german_texts(max_chars)
    return common.load_texts(domain, "validation", max_chars)


def fitted_memory(pooled: torch.Tensor, name: str, p: dict) -> ARTMemory:
    memory = ARTMemory(
        pooled.shape[1],
        vigilance=p["vigilance"][name],
        beta=p["beta"].get(name),
        max_categories=p["fitted_max_categories"],
        input_transform=INPUTS[name][2],
        lift=p["lift"],
        dtype=torch.float64,
    )
    memory.fit_input_transform(pooled.double())
    memory.update(pooled.double())
    return memory


def seen_by_rule(memory: ARTMemory, pooled: torch.Tensor) -> torch.Tensor:
    """What the memory's rule compares: the transformed rows (for the baseline on the same embeddings)."""
    return memory._check_x(pooled.double())


def input_rows(e: dict, name: str) -> torch.Tensor:
    """The pooled rows of input `name` from `common.embeddings(..., poolings=POOLINGS)`."""
    return e[INPUTS[name][:2]].double()


POOLINGS = sorted({spec[:2] for spec in INPUTS.values()})
# The calibrated verdicts whose flagged shares the report lists (the library's scores on the detector memory).
FLAGGED_METHODS = ("art+loss+outlier_exposure", "combined", f"art[{COMBINED_INPUT}]")


def run(preset: str, seeds: list[int], out: Path) -> dict:
    p = PRESETS[preset]
    header = common.start_run(NAME, preset, p, seeds)
    train_texts = common.load_texts(p["domain_a"], "train", p["train_chars"])
    tokenizer = common.make_tokenizer(p["tokenizer"], train_texts)
    train_stream = common.token_stream(train_texts, tokenizer)
    reference = common.blocks_of(train_stream, p["text_tokens"])
    reference = reference[torch.randperm(len(reference), generator=torch.Generator().manual_seed(1234))]
    reference = reference[: p["train_reference_blocks"]]
    held_out_texts = in_domain_held_out_texts(p)
    # calibration and test blocks from different documents
    calibration_blocks, calibration_docs = held_out_blocks(held_out_texts, tokenizer, p, p["calibration_blocks"])
    in_domain, in_domain_docs = held_out_blocks(held_out_texts[calibration_docs:], tokenizer, p, p["test_blocks"])
    test, skipped, documents = {p["domain_a"]: in_domain}, {}, {p["domain_a"]: in_domain_docs}
    for domain in p["other_domains"]:
        texts = novel_texts(domain, p["val_chars"])
        if not texts:
            skipped[domain] = f"no {domain} text on this machine ({GERMAN_ROOT} is empty or absent)"
            continue
        # random characters are one generated text: no documents to spread over
        spread = None if domain == "random-chars" else p["blocks_per_document"]
        test[domain], documents[domain] = held_out_blocks(texts, tokenizer, p, p["test_blocks"], spread)
    novel_domains = [domain for domain in p["other_domains"] if domain in test]
    outlier_sources = {
        name: common.blocks_of(common.token_stream(texts, tokenizer), p["text_tokens"], p["outlier_blocks"])
        for name, texts in outlier_texts(p).items()
    }
    outliers = torch.cat(list(outlier_sources.values()))

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
        ref = common.embeddings(model, reference, p["eval_batch"], poolings=POOLINGS)
        memories = {name: fitted_memory(input_rows(ref, name), name, p) for name in INPUTS}
        calib = common.embeddings(model, calibration_blocks, p["eval_batch"], art=False, poolings=POOLINGS)
        combined_memory = memories[COMBINED_INPUT]
        calib_rows = input_rows(calib, COMBINED_INPUT)
        calibration = combined_memory.calibrate(calib_rows, fpr=p["fpr"], surprise=calib["loss"])
        novelty_only = copy.deepcopy(combined_memory)  # the same memory, its verdict calibrated on novelty alone
        novelty_only.calibrate(calib_rows, fpr=p["fpr"])
        outlier_rows = input_rows(
            common.embeddings(model, outliers, p["eval_batch"], art=False, poolings=POOLINGS), COMBINED_INPUT
        )
        # the library's "outliers" score: the memory, the loss and the probe (docs/design.md#outlier-exposure)
        three_signals = copy.deepcopy(combined_memory)
        three_signals.fit_outlier_exposure(input_rows(ref, COMBINED_INPUT), outlier_rows)
        three_signals.calibrate(calib_rows, fpr=p["fpr"], surprise=calib["loss"], score="outliers")
        # the memory's combined score with the probe as its second signal: the z-score sum, from the calibration rows
        with_outliers = copy.deepcopy(combined_memory)
        with_outliers.calibrate(calib_rows, fpr=p["fpr"], surprise=three_signals.outlier_score(calib_rows))
        scores, flagged = {}, {}
        for domain, blocks in test.items():
            e = common.embeddings(model, blocks, p["eval_batch"], poolings=POOLINGS)
            s = {"art_training": e["art_novelty"]}
            for name, memory in memories.items():
                rows = input_rows(e, name)
                s[f"art[{name}]"] = memory.novelty(rows).float()
                s[f"nn_cosine[{name}]"] = nn_cosine_distance(
                    seen_by_rule(memory, input_rows(ref, name)), seen_by_rule(memory, rows)
                )
            s["nn_l2"] = nn_l2_distance(ref["pooled"], e["pooled"].double())
            s["loss"] = e["loss"]
            art_best = s[f"art[{COMBINED_INPUT}]"]
            verdict = combined_memory.verdict(art_best, e["loss"])
            s["combined"] = verdict["score"].float()
            outlier = three_signals.outlier_score(input_rows(e, COMBINED_INPUT))
            s["outlier_exposure"] = outlier.float()
            s["art+outlier_exposure"] = with_outliers.verdict(art_best, outlier)["score"].float()
            outliers_verdict = three_signals.verdict(art_best, e["loss"], outlier)
            s["art+loss+outlier_exposure"] = outliers_verdict["score"].float()
            scores[domain] = s
            flagged[domain] = {
                "art+loss+outlier_exposure": float(outliers_verdict["novel"].double().mean()),
                "combined": float(verdict["novel"].double().mean()),
                f"art[{COMBINED_INPUT}]": float(novelty_only.verdict(art_best)["novel"].double().mean()),
            }
        metrics = {}
        for domain in novel_domains:
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
                    "fitted_categories": {name: memory.num_categories for name, memory in memories.items()},
                    "calibration": calibration,
                    "flagged_at_calibrated_threshold": flagged,
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
        for domain in novel_domains
    }
    return common.finish_run(
        header,
        out,
        _plots,
        _report,
        vocab_size=len(tokenizer),
        per_seed=per_seed,
        summary=summary,
        skipped_domains=skipped,
        outlier_blocks={name: len(blocks) for name, blocks in outlier_sources.items()},
        held_out_sets={
            "calibration": {"blocks": len(calibration_blocks), "documents": calibration_docs},
            **{name: {"blocks": len(blocks), "documents": documents[name]} for name, blocks in test.items()},
        },
    )


ROC_METHODS = (
    "art[mean]",
    "art[mean+euclidean]",
    f"art[{COMBINED_INPUT}]",
    f"nn_cosine[{COMBINED_INPUT}]",
    "loss",
    "combined",
    "art+outlier_exposure",
    "art+loss+outlier_exposure",
)


def _plots(result: dict, out: Path) -> None:
    plt = common.pyplot()
    p = result["config"]
    domains = list(result["summary"])
    first = result["per_seed"][0]["scores"]
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4.5), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        for method in ROC_METHODS:
            fpr, tpr = common.roc_curve(first[p["domain_a"]][method], first[domain][method])
            auc = result["summary"][domain][method]["auroc_mean"]
            ax.plot(fpr, tpr, label=f"{method} ({auc:.3f})")
        ax.plot([0, 1], [0, 1], "k:", linewidth=1)
        ax.set(
            xlabel=f"false-positive rate (held-out {p['domain_a']} flagged)",
            ylabel=f"true-positive rate ({domain} flagged)",
            title=f"{domain} vs {p['domain_a']}, seed {result['seeds'][0]}",
        )
        common.finish_axes(ax, loc="lower right", fontsize=7)
    common.save_figure(fig, out / "roc.png")

    fig, axes = plt.subplots(2, 1, figsize=(max(10, 1.2 * len(METHODS)), 8))
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
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METHODS))], METHODS, rotation=20, fontsize=8)
        ax.set(ylabel=label, ylim=(0, 1.05))
        common.finish_axes(ax, grid_axis="y", fontsize=8)
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
    table = common.markdown_table(["novel set", "score", "AUROC", "FPR@95%TPR"], rows)
    flagged_rows = []
    for domain in [p["domain_a"], *result["summary"]]:
        cells = [domain + (" (in-domain: false alarms)" if domain == p["domain_a"] else "")]
        for method in FLAGGED_METHODS:
            values = [r["flagged_at_calibrated_threshold"][domain][method] for r in result["per_seed"]]
            cells.append(common.fmt(*common.mean_std(values), digits=2))
        flagged_rows.append(cells)
    flagged = common.markdown_table(
        ["held-out set", *(f"flagged: {method}" for method in FLAGGED_METHODS)], flagged_rows
    )
    cats = [r["art_categories"] for r in result["per_seed"]]
    fitted = {name: [r["fitted_categories"][name] for r in result["per_seed"]] for name in INPUTS}
    best = {
        domain: max(methods, key=lambda m: methods[m]["auroc_mean"]) for domain, methods in result["summary"].items()
    }
    skipped = result.get("skipped_domains") or {}
    sets = result["held_out_sets"]
    common.experiment_report(
        out,
        "Novelty detection: ART memory vs baselines",
        result,
        [
            f"Trained on `{p['domain_a']}` for {p['steps']} steps x {p['tokens_per_step']} tokens in windows of "
            f"{p['block']}; scored texts (held-out, reference and outlier blocks) of {p['text_tokens']} tokens, "
            f"{p['test_blocks']} per set ({p['calibration_blocks']} more held-out "
            f"`{p['domain_a']}` blocks calibrate the verdict at {p['fpr']:.0%} false positives). Categories: learned "
            f"during training (vigilance {p['art']['art_vigilance']}, capacity {p['art']['art_max_categories']}) "
            f"{cats}; fitted to the final model per input (vigilance {p['vigilance']}, learning rate {p['beta']} "
            f"where not 0.5, capacity {p['fitted_max_categories']}) {fitted}. `outlier_exposure` is fitted on the "
            f"reference blocks against these outlier blocks: {result['outlier_blocks']}. Held-out sets, at most "
            f"{p['blocks_per_document']} blocks per document (random characters: one text): "
            + ", ".join(f"{name} {v['blocks']} blocks of {v['documents']} documents" for name, v in sets.items())
            + "."
            + (f" Left out: {skipped}." if skipped else ""),
            "## Detection (mean ± s.d. over seeds; novel set = positive class)\n\n" + table,
            "## The calibrated verdict (share of each held-out set called novel at the 5% threshold)\n\n" + flagged,
            "## Reading\n\nBest score per novel set: "
            + ", ".join(f"{d}: `{m}`" for d, m in best.items())
            + ". ART wins only where its row beats both baselines.",
            "![roc](roc.png)\n\n![metrics](metrics.png)",
        ],
    )
