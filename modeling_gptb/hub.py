"""`gptb push`: upload a saved GPTB model folder (the output of `gptb train`, or any `save_pretrained` folder) to the
Hugging Face Hub as it is, model card included.

    url = push_folder("runs/gptb-tiny", "me/gptb-tiny")

Everything in the folder goes up except training leftovers (`checkpoints/`, `.incoming/`, temporary files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Training leftovers that do not belong in a model repo (patterns relative to the folder, as upload_folder takes them)
IGNORE_PATTERNS = ["checkpoints/", ".incoming/", "*.tmp", "*.tmp/", "*.partial", "*.lock"]
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def check_model_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a Path if it holds a saved GPTB model (config.json with model_type gptb, and safetensors
    weights); a ValueError saying what is missing otherwise."""
    path = Path(folder)
    hint = "pass the output folder of `gptb train` or a folder written by `model.save_pretrained`"
    if not path.is_dir():
        raise ValueError(f"{folder} is not a folder: {hint}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json, so it is not a saved model: {hint}")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{folder}/config.json is not a valid model config ({error}): {hint}") from error
    if model_type != "gptb":
        raise ValueError(f"{folder} holds a {model_type or 'unknown'!r} model, not a GPTB model: {hint}")
    if not any((path / name).is_file() for name in WEIGHTS):
        raise ValueError(f"{folder} holds no model.safetensors (the weights): {hint}")
    return path


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload GPTB model",
) -> str:
    """Create `repo_id` if it does not exist (private with `private=True`, else the Hub's default visibility) and
    upload the model folder to it; files the repo already holds unchanged are skipped. Returns the repo's URL."""
    from huggingface_hub import HfApi

    path = check_model_folder(folder)
    api = HfApi(token=token, library_name="gptb")
    url = api.create_repo(repo_id, private=private or None, exist_ok=True)
    api.upload_folder(
        repo_id=url.repo_id, folder_path=path, commit_message=commit_message, ignore_patterns=list(IGNORE_PATTERNS)
    )
    return str(url)
