"""Presets kept as data in `configuration/`: model configs, training recipes and Accelerate configs.

    configuration/models/<name>.json       GPTBConfig keyword arguments      load_model_preset("gptb-tiny")
    configuration/recipes/<name>.json      training settings for `gptb train`  load_recipe("tiny-cpu")
    configuration/accelerate/<name>.yaml   `accelerate launch --config_file`   accelerate_config_path("cpu-2proc")

Each loader takes a preset name or a path to a file. In a JSON preset the key "_comment" is a note and is dropped.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

DATA_KINDS = ("configuration", "hub_cards")
# Preset kind -> (file suffixes, what to call it in messages)
PRESET_KINDS = {
    "models": ((".json",), "model preset"),
    "recipes": ((".json",), "recipe"),
    "accelerate": ((".yaml", ".yml"), "accelerate config"),
}
# Something only our data folders hold, so an unrelated top-level folder named `configuration` is never taken.
_SENTINELS = {"configuration": "models", "hub_cards": "gptb_model_card.md"}


def data_dir(kind: str) -> Path:
    """The folder of GPTB's data files: kind "configuration" or "hub_cards".

    In a repository checkout or an editable install it is the folder beside the package; in an installed wheel it
    is the package `gptb_<kind>` that setup.cfg maps the folder to.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data folder {kind!r}; expected one of {', '.join(DATA_KINDS)}")
    local = Path(__file__).resolve().parents[1] / kind
    if (local / _SENTINELS[kind]).exists():
        return local
    package = f"gptb_{kind}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"GPTB's {kind!r} data folder is missing: not at {local} and no installed package {package!r}; "
            "reinstall gptb"
        )
    # The package's folder; this also covers namespace packages (no __init__.py), whose resources are not a Path.
    return Path(next(iter(spec.submodule_search_locations)))


def list_presets(kind: str) -> list[str]:
    """Names of the presets of one kind: "models", "recipes" or "accelerate"."""
    suffixes, _ = _preset_kind(kind)
    folder = data_dir("configuration") / kind
    return sorted(p.stem for p in folder.iterdir() if p.suffix in suffixes and p.is_file()) if folder.is_dir() else []


def _preset_kind(kind: str) -> tuple[tuple[str, ...], str]:
    if kind not in PRESET_KINDS:
        raise ValueError(f"unknown preset kind {kind!r}; expected one of {', '.join(PRESET_KINDS)}")
    return PRESET_KINDS[kind]


def _resolve(kind: str, name_or_path: str | os.PathLike) -> Path:
    """A preset's file: `name_or_path` itself if it is a file, else the preset of that name."""
    suffixes, label = _preset_kind(kind)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = os.fspath(name_or_path)
    if "/" in text or os.sep in text:  # meant as a path, not a name
        raise FileNotFoundError(f"{label} file {text!r} does not exist")
    name = path.stem if path.suffix in suffixes else text
    folder = data_dir("configuration") / kind
    for suffix in suffixes:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    available = ", ".join(list_presets(kind)) or "none"
    raise ValueError(
        f"unknown {label} {text!r}; available: {available}; or pass a path to a {' or '.join(suffixes)} file"
    )


def _load_json(kind: str, name_or_path: str | os.PathLike) -> dict:
    path = _resolve(kind, name_or_path)
    label = PRESET_KINDS[kind][1]
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{label} {str(path)!r} is not valid JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{label} {str(path)!r} cannot be read: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{label} {str(path)!r} must hold a JSON object, got {type(values).__name__}")
    values.pop("_comment", None)
    return values


def load_model_preset(name_or_path: str | os.PathLike) -> dict:
    """Keyword arguments for `GPTBConfig` from a model preset ("gptb-tiny", "gptb-small") or a .json file."""
    return _load_json("models", name_or_path)


def load_recipe(name_or_path: str | os.PathLike) -> dict:
    """Training settings from a recipe ("tiny-cpu") or a .json file."""
    return _load_json("recipes", name_or_path)


def accelerate_config_path(name_or_path: str | os.PathLike) -> Path:
    """Path of an Accelerate config ("cpu-single", "cpu-2proc", "gpu-single-bf16", "gpu-multi") or a .yaml file,
    for `accelerate launch --config_file`."""
    return _resolve("accelerate", name_or_path).resolve()
