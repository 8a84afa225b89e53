"""The ART resonance report of a GPTB model: what its memory holds, and how novel given texts look to it."""

import torch


@torch.no_grad()
def art_report(model, tokenizer, texts=(), top=5) -> dict:
    """
    A dict with the memory's rule, hyperparameters, category count and the most used categories, plus, for each of
    `texts`, the category it falls in (-1 if none passes the vigilance), what an update would do, and its novelty.
    Nothing is learned.
    """
    memory = model.art_memory
    if memory is None:
        raise ValueError("the model has no ART memory: config.art_enabled is false")
    counts = memory.counts.tolist()
    ranked = sorted(range(len(counts)), key=lambda index: (-counts[index], index))[:top]
    report = {
        "rule": memory.rule,
        "vigilance": memory.vigilance,
        "beta": memory.beta,
        "max_categories": memory.max_categories,
        "num_categories": memory.num_categories,
        "sequences_seen": int(sum(counts)),
        "top_categories": [{"category": index, "count": counts[index]} for index in ranked],
        "texts": [],
    }
    device = next(model.parameters()).device
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :512].to(device)
        if ids.shape[1] == 0:
            continue
        out = model(ids, art_mode="classify")
        report["texts"].append(
            {
                "text": text[:60],
                "category": int(out.art_category[0]),
                "status": ["resonated", "new", "rejected"][int(out.art_status[0])],
                "novelty": float(out.art_novelty[0]),
            }
        )
    return report


def format_art_report(report: dict) -> str:
    lines = [
        f"ART memory ({report['rule']}, vigilance {report['vigilance']}, beta {report['beta']}): "
        f"{report['num_categories']} of {report['max_categories']} categories "
        f"from {report['sequences_seen']} sequences",
    ]
    if report["top_categories"]:
        busiest = ", ".join(f"#{c['category']}: {c['count']}" for c in report["top_categories"])
        lines.append(f"  busiest categories: {busiest}")
    for item in report["texts"]:
        lines.append(
            f"  novelty {item['novelty']:.3f}  {item['status']:9s} category {item['category']:>4d}  {item['text']!r}"
        )
    return "\n".join(lines)
