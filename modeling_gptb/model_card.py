"""README.md model cards for GPTB models, rendered from `hub_cards/gptb_model_card.md` with huggingface_hub.

    card = render_model_card(model, training={"steps": 160, "eval_loss": 3.2}, repo_id="me/gptb-tiny")
    card.save(Path(folder) / "README.md")

The one card of GPTB: `save_pretrained` and `gptb train` both render it. Given a model, the parameter count and the
ART category count come from the model itself. Works offline. Every value is optional: what is missing renders as
"n/a".
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import ModelCard

from .presets import data_dir
from .remote_card import USAGE, card_data, design_url, install_command, source_url

TEMPLATE_NAME = "gptb_model_card.md"
NA = "n/a"
USAGE_PLACEHOLDER = "path/to/gptb-model"  # stands in for the repo id in the usage snippet when there is none

# Training and ART report keys that have their own row in the card; other keys get generic rows.
_TRAINING_KEYS = ("data", "steps", "tokens", "eval_loss", "eval_perplexity")
_ART_KEYS = ("num_categories", "rule", "vigilance", "beta", "max_categories", "pooling", "loss_weight")


def template_path() -> Path:
    """Path of the model card template shipped with GPTB."""
    return data_dir("hub_cards") / TEMPLATE_NAME


def _fmt(value, spec: str = "") -> str:
    """A value for a markdown table cell: "n/a" for missing ones, `spec` for numbers, pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float) and spec:
        return format(value, spec)
    if isinstance(value, list | tuple):
        value = ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _extra_rows(values: Mapping, known: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(key.replace("_", " ").capitalize(), _fmt(value)) for key, value in values.items() if key not in known]


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1024:,.1f} KiB" if num_bytes < 1024**2 else f"{num_bytes / 1024**2:,.1f} MiB"


def render_model_card(
    model_or_config,
    *,
    base_model: str | None = None,
    datasets: list[str] | str | None = None,
    training: Mapping | None = None,
    art_report: Mapping | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    num_parameters: int | None = None,
    template: str | os.PathLike | None = None,
) -> ModelCard:
    """Render a model card for a GPTB model.

    Args:
        model_or_config: the model (its config, parameter count and ART memory are read), or a `GPTBConfig` or its
            dict.
        base_model: Hub id of the checkpoint it was warm-started from, if any (goes into the metadata too).
        datasets: Hub dataset ids for the metadata. Local data (a built-in corpus, files) belongs in
            `training["data"]`, a free-text description for the card's body.
        training: `steps`, `tokens`, `eval_loss`, `eval_perplexity`, `data`; other keys are listed as they come.
        art_report: `num_categories` and any other statistics of the ART memory (extra keys listed as they come).
        repo_id: the Hub id used in the usage snippet and the title.
        license, tags: metadata; `tags` are added to GPTB's own.
        num_parameters: the parameter count, for the architecture table (default: counted on the model).
        template: a different Jinja2 template file (default: `hub_cards/gptb_model_card.md`).
    """
    config = getattr(model_or_config, "config", model_or_config)
    values = config if isinstance(config, Mapping) else config.to_dict()
    training = dict(training or {})
    art_report = dict(art_report or {})
    if config is not model_or_config:  # a model: its own facts, unless the caller measured them
        if num_parameters is None:
            num_parameters = model_or_config.num_parameters()
        memory = getattr(model_or_config, "art_memory", None)
        if memory is not None:
            art_report.setdefault("num_categories", memory.num_categories)
    art_enabled = bool(values.get("art_enabled", False))
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or []) or None

    metadata = card_data(art_enabled, license=license, tags=tags, datasets=datasets, base_model=base_model)

    state_size, n_embd = values.get("state_size"), values.get("n_embd")
    state = NA
    if isinstance(state_size, int) and isinstance(n_embd, int):
        state = (
            f"{state_size} x {n_embd} = {state_size * n_embd:,} numbers "
            f"({_size(4 * state_size * n_embd)} in float32), constant in the sequence length"
        )
    segment_steps = isinstance(values.get("segment_length"), int) and values["segment_length"] > 1
    rebias = {
        True: "true: bidirectional attention inside the window, so every state slot reads the new token",
        False: "false: GPT-2's causal mask inside the window; the state cannot read the input",
    }
    if segment_steps:
        rebias = {
            True: "true: the segment mask (read slots read each other, tokens the read slots and earlier tokens, "
            "write slots everything)",
            False: "false: GPT-2's causal order over the whole window (a control)",
        }
    rebias = rebias.get(values.get("rebias"), NA)

    if values.get("n_inner"):
        n_inner = _fmt(values["n_inner"], ",")
    else:  # GPT-2's default
        n_inner = f"{4 * n_embd:,} (4 x n_embd)" if isinstance(n_embd, int) else NA

    def art(key: str, spec: str = "") -> str:
        value = art_report.get(key, values.get(f"art_{key}"))
        return _fmt(value, spec)

    context = {
        "model_name": repo_id.rsplit("/", 1)[-1] if repo_id else "GPTB model",
        "repo_id": repo_id or USAGE_PLACEHOLDER,
        "base_model": base_model or NA,
        "n_layer": _fmt(values.get("n_layer")),
        "n_embd": _fmt(n_embd),
        "n_head": _fmt(values.get("n_head")),
        "n_inner": n_inner,
        "vocab_size": _fmt(values.get("vocab_size"), ","),
        "num_parameters": _fmt(num_parameters, ","),
        "state_size": _fmt(state_size),
        # configs saved before segment steps have no segment_length: they read one token per step
        "segment_length": _fmt(values.get("segment_length", 1)),
        "segment_steps": segment_steps,
        "state_per_sequence": state,
        "rebias": rebias,
        "bptt_steps": _fmt(values.get("bptt_steps")) if values.get("bptt_steps") else "none (full backpropagation)",
        "art_enabled": art_enabled,
        "art_rule": art("rule"),
        "art_vigilance": art("vigilance", "g"),
        "art_beta": art("beta", "g") if art("beta") != NA else "the rule's default",
        "art_max_categories": art("max_categories", ","),
        "art_pooling": art("pooling") + (" over every layer" if values.get("art_pool_layers") == "all" else ""),
        "art_loss_weight": art("loss_weight", "g"),
        "art_num_categories": _fmt(art_report.get("num_categories"), ","),
        "art_extra": _extra_rows(art_report, _ART_KEYS),
        "training_data": _fmt(training.get("data") or datasets),
        "steps": _fmt(training.get("steps"), ","),
        "tokens": _fmt(training.get("tokens"), ","),
        "eval_loss": _fmt(training.get("eval_loss"), ".4f"),
        "eval_perplexity": _fmt(training.get("eval_perplexity"), ".2f"),
        "training_extra": _extra_rows(training, _TRAINING_KEYS),
        "usage": USAGE.format(repo_id=repo_id or USAGE_PLACEHOLDER),
        "source_url": source_url(),
        "design_url": design_url(),
        "install_command": install_command(),
    }
    return ModelCard.from_template(metadata, template_path=str(template or template_path()), **context)
