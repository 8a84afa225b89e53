"""`gptb push`: upload a saved GPTB model folder (the output of `gptb train`, or any `save_pretrained` folder) to the
Hugging Face Hub as it is, model card included.

    url = push_folder("runs/gptb-tiny", "me/gptb-tiny")

Everything in the folder goes up except training leftovers (`checkpoints/`, `.incoming/`, temporary files).
"""

from __future__ import annotations

import os

from .model_folder import check_model_folder

# Training leftovers that do not belong in a model repo (patterns relative to the folder, as upload_folder takes them)
IGNORE_PATTERNS = ["checkpoints/", ".incoming/", "*.tmp", "*.tmp/", "*.partial", "*.lock"]


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
