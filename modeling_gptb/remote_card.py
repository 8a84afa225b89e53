"""What every GPTB model card needs, in a form the remote code can use on its own: the source address, the install
line, the card's tags, and a short card for folders saved where only the remote code is at hand (for example
`Trainer.save_model` after `from_pretrained(..., trust_remote_code=True)`), without the `gptb` package's template.

The source address is set in one place, `url` in setup.cfg, and read from the installed package's metadata;
`SOURCE_URL` is the fallback for the remote code, where the package (and its metadata) is absent. The full card:
`modeling_gptb/model_card.py`; the design document: docs/design.md#file-formats.
"""

from __future__ import annotations

import importlib.metadata

from huggingface_hub import ModelCardData

# Equal to setup.cfg's `url` (tests/test_model_card.py checks it): only read where the package is not installed.
SOURCE_URL = "https://github.com/gptb-project/gptb"
BASE_TAGS = ("gptb", "gpt2", "recurrent", "custom_code")


def source_url() -> str:
    """The GPTB source repository: the installed package's `Home-page` (setup.cfg `url`), else `SOURCE_URL`."""
    try:
        return importlib.metadata.metadata("gptb").get("Home-page") or SOURCE_URL
    except importlib.metadata.PackageNotFoundError:
        return SOURCE_URL


def design_url() -> str:
    return f"{source_url()}/blob/main/docs/design.md"


def install_command() -> str:
    # The CPU build of torch first where that is wanted: see the repository's README.
    return f'pip install "gptb @ git+{source_url()}"'


def card_data(art_enabled: bool, **metadata) -> ModelCardData:
    """The card's YAML metadata: GPTB's tags (and `art-memory` with an ART memory) before any `tags` given."""
    tags = [*BASE_TAGS, *(["art-memory"] if art_enabled else []), *(metadata.pop("tags", None) or [])]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=metadata.pop("license", "apache-2.0"),
        tags=list(dict.fromkeys(tags)),  # in order, without duplicates
        **metadata,
    )


USAGE = """```python
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = PreTrainedTokenizerFast.from_pretrained("{repo_id}")

inputs = tokenizer("Return the", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=50, do_sample=True, top_k=50)
print(tokenizer.decode(output[0], skip_special_tokens=True))
```"""


def short_model_card(model, repo_id: str | None = None) -> str:
    """A shorter `README.md` for a model saved by the remote code alone: metadata, the model's size, usage, and
    where the full description and the package are."""
    config = model.config
    art = model.art_memory
    memory = f"{art.num_categories:,} categories learned" if art is not None else "none (`art_enabled: false`)"
    rows = {
        "Layers": config.n_layer,
        "Width (`n_embd`)": config.n_embd,
        "Attention heads": config.n_head,
        "Vocabulary": f"{config.vocab_size:,}",
        "Parameters": f"{model.num_parameters():,}",
        "State size M (slots)": config.state_size,
        "ART memory": memory,
    }
    table = "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows.items())])
    name = repo_id.rsplit("/", 1)[-1] if repo_id else "GPTB model"
    return f"""---
{card_data(art is not None).to_yaml()}
---

# {name}

A **GPTB** model: GPT-2 made recurrent, with an Adaptive Resonance Theory (ART) memory. Each step runs GPT-2 blocks
over a fixed-size state plus the new token, so generating token 100,000 costs what token 10 did and a sequence's
memory does not grow with its length.

{table}

## Usage

The model code ships with the weights: load it with `trust_remote_code=True` (`transformers>=5.24`).
`generation_config.json` holds the special tokens only, so `generate()` uses transformers' defaults (greedy, 20 new
tokens) unless you pass `max_new_tokens`, `do_sample` and so on.

{USAGE.format(repo_id=repo_id or "path/to/gptb-model")}

This card was written by the model's remote code, without the `gptb` package: the full card (training data, ART
settings, limitations) is written where the package is installed. Source and documentation: {source_url()}
(the exact semantics: [docs/design.md]({design_url()})). Install the package with `{install_command()}`.
"""
