"""The ART resonance report of a GPTB model: what its memory holds, and how novel given texts look to it."""

import math

import torch

# What an update would do with a text, as a reader should see it (`classify` learns nothing).
_VERDICTS = {
    "resonated": "resonates with category #{category}",
    "new": "novel (no category)",
    "rejected": "novel (no category; the memory is full)",
}
_QUANTILES = (0.5, 0.9, 0.99)


@torch.no_grad()
def art_report(model, tokenizer, texts=(), top=5) -> dict:
    """
    A dict with the memory's rule, hyperparameters, category count, the most used categories and the novelty of the
    sequences it learned from (`training_novelty`: quantile -> novelty, None before any), plus, for each of `texts`,
    the category it falls in (-1 if none passes the vigilance), what an update would do (`status`, and `verdict` in
    words), its novelty and that novelty's percentile among the training sequences' (None before any). Nothing is
    learned.
    """
    memory = model.art_memory
    if memory is None:
        raise ValueError("the model has no ART memory: config.art_enabled is false")
    counts = memory.counts.tolist()
    ranked = sorted(range(len(counts)), key=lambda index: (-counts[index], index))[:top]
    learned_any = bool(memory.novelty_histogram.any())
    report = {
        "rule": memory.rule,
        "vigilance": memory.vigilance,
        "beta": memory.beta,
        "max_categories": memory.max_categories,
        "num_categories": memory.num_categories,
        "sequences_seen": int(sum(counts)),
        "top_categories": [{"category": index, "count": counts[index]} for index in ranked],
        "training_novelty": {q: memory.novelty_quantile(q) for q in _QUANTILES} if learned_any else None,
        "texts": [],
    }
    device = next(model.parameters()).device
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :512].to(device)
        if ids.shape[1] == 0:
            continue
        out = model(ids, art_mode="classify")
        category, status = int(out.art_category[0]), ["resonated", "new", "rejected"][int(out.art_status[0])]
        novelty = float(out.art_novelty[0])
        percentile = float(memory.novelty_percentile(torch.tensor([novelty]))[0])
        report["texts"].append(
            {
                "text": text[:60],
                "category": category,
                "status": status,
                "verdict": _VERDICTS[status].format(category=category),
                "novelty": novelty,
                "novelty_percentile": None if math.isnan(percentile) else percentile,
            }
        )
    return report


def format_art_report(report: dict, texts: str = "the given texts") -> str:
    """The report as lines to print; `texts` says what the scored texts are, in their header."""
    lines = [
        f"ART memory ({report['rule']}, vigilance {report['vigilance']}, beta {report['beta']}): "
        f"{report['num_categories']} of {report['max_categories']} categories "
        f"from {report['sequences_seen']} sequences",
    ]
    if report["top_categories"]:
        busiest = ", ".join(f"#{c['category']}: {c['count']}" for c in report["top_categories"])
        lines.append(f"  busiest categories: {busiest}")
    training = report.get("training_novelty")
    if training:
        spread = ", ".join(f"{_ordinal(100 * q)} percentile {value:.3f}" for q, value in training.items())
        lines.append(f"  novelty of the training sequences: {spread}")
    if report["texts"]:
        lines.append(f"  {texts}: novelty (1 - similarity to the nearest category), where it falls, verdict, text")
    for item in report["texts"]:
        percentile = item.get("novelty_percentile")
        if percentile is None:
            where = "no training novelty recorded"
        else:
            where = f"{_ordinal(percentile)} percentile of training"
        lines.append(f"    novelty {item['novelty']:.3f} ({where}): {item['verdict']}  {item['text']!r}")
    return "\n".join(lines)


def _ordinal(value: float) -> str:
    n = round(value)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
