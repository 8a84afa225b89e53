"""The ART memory of a GPTB model as a user meets it: fitted to the trained model (`fit_art_memory`), calibrated on
held-out in-domain text (`calibrate_art_memory`), and reported in words (`art_report`, `gptb art-report`).
Design: docs/design.md#what-the-memory-sees and #calibrated-verdict."""

import copy
import math

import torch
import torch.nn.functional as F

from .modeling_gptb import art_memory_for, first_valid_tokens

_QUANTILES = (0.5, 0.9, 0.99)
# An uncalibrated memory's verdict is the vigilance's: what an update would do with the text (`classify`).
_VIGILANCE_VERDICTS = {
    "resonated": "familiar: resonates with category #{category} (vigilance; not calibrated)",
    "new": "novel: no category passes the vigilance (not calibrated)",
    "rejected": "novel: no category passes the vigilance, and the memory is full (not calibrated)",
}
_SNIPPET_CHARS = 60


@torch.no_grad()
def sequence_scores(model, input_ids, attention_mask=None, batch_size: int = 32) -> dict:
    """
    For each sequence of `input_ids` (N, T): `pooled`, the vector the memory is given (`model.art_vectors`, as in
    `forward`); `surprise`, the model's mean per-token loss over its valid next-token targets (NaN for a sequence with
    fewer than two valid tokens). Read only; batches of `batch_size`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pooled, surprise = [], []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            outputs, vectors = model.art_vectors(ids, mask)
            pooled.append(vectors.float())
            logits = model.lm_head(outputs.last_hidden_state)
            per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            valid = torch.ones_like(per_token) if mask is None else (mask[:, 1:] * mask[:, :-1]).to(per_token.dtype)
            surprise.append((per_token * valid).sum(1) / valid.sum(1))  # 0 / 0 = NaN: nothing to predict
    finally:
        model.train(was_training)
    return {"pooled": torch.cat(pooled), "surprise": torch.cat(surprise)}


def _memory(model):
    if getattr(model, "art_memory", None) is None:
        raise ValueError("the model has no ART memory: config.art_enabled is false")
    return model.art_memory


def fit_art_memory(
    model,
    input_ids,
    attention_mask=None,
    batch_size: int = 32,
    input_transform: str | None = None,
    vigilance: float | None = None,
    pooling: str | None = None,
    pool_layers: str | None = None,
    max_categories: int | None = None,
    beta: float | None = None,
    outlier_ids=None,
    outlier_attention_mask=None,
) -> dict:
    """
    Rebuild the model's ART memory from the trained model's own states: fit the input transform on the pooled
    vectors of `input_ids` (a sample of training sequences), forget the categories learned while the representation
    was still changing, and learn these sequences in order (each new category keeps its sequence's first tokens).

    `input_transform`, `vigilance`, `pooling`, `pool_layers`, `max_categories` and `beta`, if given, replace the
    config's `art_*` field of the same name (`art_input_transform`, ...; the config is updated, so the model saves and
    loads with them): train with the default input, then fit the memory a detector needs (the novelty experiment's
    best: `pooling="mean_std_max", pool_layers="all", input_transform="standardize", vigilance=0.98, beta=0.1`, with
    room for about half the fitted sequences as categories). A bad value is refused before the model changes, and a
    fit that fails (rows all the same, bad outlier rows) puts back the old memory and config.

    `outlier_ids`, *optional*: sequences of text that is not the model's domain and not what you mean to detect
    (other languages, random characters): the outlier probe is fitted against them (`ARTMemory.fit_outlier_exposure`;
    docs/design.md#outlier-exposure), and `calibrate_art_memory` then calibrates the `"outliers"` score, the novelty
    experiment's best. Under `torch.distributed` each rank passes its share. Returns `{"categories": ...,
    "sequences": ..., "outlier_sequences": ...}`.
    """
    given = {
        "art_input_transform": input_transform,
        "art_vigilance": vigilance,
        "art_pooling": pooling,
        "art_pool_layers": pool_layers,
        "art_max_categories": max_categories,
        "art_beta": beta,
    }
    old = _memory(model)
    wanted = copy.deepcopy(model.config)
    for field, value in given.items():
        if value is not None:
            setattr(wanted, field, value)
    wanted.check_values()
    memory = art_memory_for(wanted, device=old.weight.device, dtype=old.weight.dtype)  # checks the memory's values
    previous = {field: getattr(model.config, field) for field in given}
    model.art_memory = memory
    for field in given:
        setattr(model.config, field, getattr(wanted, field))
    try:
        pooled = sequence_scores(model, input_ids, attention_mask, batch_size)["pooled"]
        memory.fit_input_transform(pooled)
        memory.update(pooled, exemplars=first_valid_tokens(input_ids, attention_mask))
        fitted = {"categories": memory.num_categories, "sequences": int(memory.rows_seen), "outlier_sequences": 0}
        if outlier_ids is not None:
            outliers = sequence_scores(model, outlier_ids, outlier_attention_mask, batch_size)["pooled"]
            memory.fit_outlier_exposure(pooled, outliers)
            fitted["outlier_sequences"] = len(outliers)
    except BaseException:  # leave the model as it was: its old memory and config
        model.art_memory = old
        for field, value in previous.items():
            setattr(model.config, field, value)
        raise
    return fitted


def calibrate_art_memory(
    model, input_ids, attention_mask=None, fpr: float = 0.05, score: str | None = None, batch_size: int = 32
) -> dict:
    """
    Calibrate the verdict on held-out in-domain sequences: afterwards a share `fpr` of such text is called novel
    (`ARTMemory.calibrate`). `score`: `"outliers"` (the default where `fit_art_memory` fitted the outlier probe: the
    memory's novelty, the model's surprise and the probe, the best detector in `gptb experiment novelty`),
    `"combined"` (the default otherwise: the memory's novelty plus the model's surprise) or `"novelty"` (the memory
    alone). Returns the calibration.
    """
    scores = sequence_scores(model, input_ids, attention_mask, batch_size)
    keep = torch.isfinite(scores["surprise"])
    return _memory(model).calibrate(scores["pooled"][keep], fpr=fpr, surprise=scores["surprise"][keep], score=score)


def _describe(memory, tokenizer, category: int) -> dict:
    described = memory.describe_category(category)
    exemplar = tokenizer.decode(described.pop("exemplar")) if described["exemplar"] else None
    described["exemplar"] = None if exemplar is None else exemplar[:_SNIPPET_CHARS]
    return described


def _verdict_words(novel: bool, percentile: float, fpr: float) -> str:
    if novel:
        return f"novel: less familiar than {percentile:.0f}% of in-domain text (calibrated at {fpr:.0%} false alarms)"
    return f"familiar: as familiar as in-domain text ({_ordinal(percentile)} percentile; novel above {1 - fpr:.0%})"


@torch.no_grad()
def art_report(model, tokenizer, texts=(), top=5) -> dict:
    """
    What the memory holds (rule, transform, categories used, the busiest categories described: count, when each was
    created and the start of the sequence that created it), its calibration, and for each of `texts`: its `novelty`
    (the memory's), `surprise` (the model's mean loss), the calibrated `score`, `percentile` among held-out in-domain
    text and `verdict` in words, the `status` an update would give, and the `nearest` category described. An
    uncalibrated memory (`calibrate_art_memory` never run, or a file saved before) reports the percentile among the
    training sequences and the vigilance's verdict instead. Nothing is learned.
    """
    memory = _memory(model)
    counts = memory.counts.tolist()
    ranked = sorted(range(len(counts)), key=lambda index: (-counts[index], index))[:top]
    learned_any = bool(memory.novelty_histogram.any())
    calibration = memory.calibration_report()
    report = {
        "rule": memory.rule,
        "input_transform": memory.input_transform,
        "vigilance": memory.vigilance,
        "beta": memory.beta,
        "max_categories": memory.max_categories,
        "num_categories": memory.num_categories,
        "sequences_seen": int(sum(counts)),
        "top_categories": [_describe(memory, tokenizer, index) for index in ranked],
        "training_novelty": {q: memory.novelty_quantile(q) for q in _QUANTILES} if learned_any else None,
        "calibration": calibration,
        "texts": [],
    }
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
        if ids.shape[1] == 0:
            continue
        scores = sequence_scores(model, ids)
        out = model(ids.to(next(model.parameters()).device), art_mode="classify")
        novelty, surprise = out.art_novelty.double().cpu(), scores["surprise"].double().cpu()
        nearest = int(memory.nearest(scores["pooled"])[0])
        item = {
            "text": text[:_SNIPPET_CHARS],
            "status": out.art_status_names()[0],
            "category": int(out.art_category[0]),
            "novelty": float(novelty[0]),
            "surprise": float(surprise[0]),
            "nearest": None if nearest < 0 else _describe(memory, tokenizer, nearest),
        }
        if calibration is not None and (calibration["score"] == "novelty" or math.isfinite(item["surprise"])):
            outliers = memory.outlier_score(scores["pooled"]) if calibration["score"] == "outliers" else None
            verdict = memory.verdict(novelty, surprise, outliers)
            item |= {"score": float(verdict["score"][0]), "percentile": float(verdict["percentile"][0])}
            item["novel"] = bool(verdict["novel"][0])
            item["verdict"] = _verdict_words(item["novel"], item["percentile"], calibration["fpr"])
        else:
            percentile = float(memory.novelty_percentile(novelty)[0])
            item["percentile"] = None if math.isnan(percentile) else percentile
            item["novel"] = item["status"] != "resonated"
            item["verdict"] = _VIGILANCE_VERDICTS[item["status"]].format(category=int(out.art_category[0]))
        report["texts"].append(item)
    return report


def _category_line(described: dict) -> str:
    created = "" if described["created_at"] < 0 else f", created at sequence {described['created_at']}"
    exemplar = "" if described["exemplar"] is None else f", e.g. {described['exemplar']!r}"
    count = described["count"]
    return f"#{described['category']} ({count} sequence{'' if count == 1 else 's'}{created}{exemplar})"


def format_art_report(report: dict, texts: str = "the given texts") -> str:
    """The report as lines to print; `texts` says what the scored texts are, in their header."""
    transform = "" if report.get("input_transform", "none") == "none" else f", input {report['input_transform']}"
    lines = [
        f"ART memory ({report['rule']}{transform}, vigilance {report['vigilance']}, beta {report['beta']}): "
        f"{report['num_categories']} of {report['max_categories']} categories "
        f"from {report['sequences_seen']} sequences",
    ]
    for described in report["top_categories"]:
        lines.append(f"  busiest: {_category_line(described)}")
    training = report.get("training_novelty")
    if training:
        spread = ", ".join(f"{_ordinal(100 * q)} percentile {value:.3f}" for q, value in training.items())
        lines.append(f"  novelty of the training sequences: {spread}")
    calibration = report.get("calibration")
    if calibration:
        lines.append(
            f"  calibrated on {calibration['rows']} held-out in-domain sequences: score {calibration['score']}, "
            f"{calibration['fpr']:.0%} of in-domain text is called novel"
        )
    else:
        lines.append(
            "  not calibrated: for a verdict you can trust, fit and calibrate the memory (gptb art-report FOLDER "
            "--fit-on CORPUS_OR_FILE --calibrate-on CORPUS_OR_FILE --save, or fit_art_memory and calibrate_art_memory)"
        )
    if report["texts"]:
        what = "each text, its verdict with novelty (1 - similarity to the nearest category), that category"
        lines.append(f"  {texts}: {what}")
    for item in report["texts"]:
        lines.append(f"  {item['text']!r}")
        where = "" if item.get("percentile") is None else f", {_ordinal(item['percentile'])} percentile"
        score = f", score {item['score']:.2f}" if "score" in item else ""
        lines.append(
            f"    {item['verdict']}  (novelty {item['novelty']:.3f}, surprise {item['surprise']:.2f}{score}{where})"
        )
        if item["nearest"] is not None:
            lines.append(f"    nearest category {_category_line(item['nearest'])}")
    return "\n".join(lines)


def _ordinal(value: float) -> str:
    n = round(value)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
