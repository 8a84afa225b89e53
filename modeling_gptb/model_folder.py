"""What a saved GPTB model folder must hold, checked before the CLI loads or uploads it.

    path = check_model_folder("runs/gptb-tiny")  # a ValueError naming the problem, or the folder as a Path

A folder passes when its `config.json` is a GPTB config that states `art_enabled`, its safetensors weights hold
exactly the tensors (names and shapes) of the model that config describes, and `art_memory.safetensors` is there
exactly when the config enables the memory. Only file headers are read: no tensor is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .art_memory import ART_MEMORY_FILE

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
HINT = "pass the output folder of `gptb train` or a folder written by `model.save_pretrained`"


def _read_config(path: Path, folder) -> dict:
    if not (path / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json, so it is not a saved model: {HINT}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{folder}/config.json is not a valid model config ({error}): {HINT}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{folder}/config.json is not a valid model config (expected a JSON object): {HINT}")
    if config.get("model_type") != "gptb":
        raise ValueError(f"{folder} holds a {config.get('model_type') or 'unknown'!r} model, not a GPTB model: {HINT}")
    if not isinstance(config.get("art_enabled"), bool):
        raise ValueError(
            f"{folder}/config.json does not say whether the model has an ART memory: expected "
            f'"art_enabled": true or false, got {config.get("art_enabled", "nothing")!r}'
        )
    return config


def _saved_shapes(path: Path, folder) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the headers of `model.safetensors` or of the shards its index names."""
    from safetensors import safe_open

    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif (path / WEIGHTS_INDEX_FILE).is_file():
        weight_map = json.loads((path / WEIGHTS_INDEX_FILE).read_text(encoding="utf-8")).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        raise ValueError(f"{folder} holds no {WEIGHTS_FILE} (the weights): {HINT}")
    shapes = {}
    for file in files:
        try:
            with safe_open(file, "pt") as weights:
                shapes.update({name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()})
        except Exception as error:  # safetensors raises its own error types for a broken header
            raise ValueError(f"{file} is not a readable safetensors file ({error}): {HINT}") from error
    return shapes


LAYER_PREFIX = "transformer.h.0."


def _expected_shapes(path: Path, folder, saved: int) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The tensors the config's model saves, and the tied ones it may omit. One block is built (on the meta device:
    no memory) and its names repeated for each layer, unless the config describes far more tensors than the weights'
    header holds (`saved`): the work is bounded by the files' sizes, whatever n_layer the config claims."""
    import torch

    from .configuration_gptb import GPTBConfig
    from .modeling_gptb import GPTBLMHeadModel, art_memory_for

    config = GPTBConfig.from_pretrained(path)
    memory = {}
    if config.art_enabled:  # its width may depend on n_layer (art_pool_layers="all")
        with torch.device("meta"):
            memory = {f"art_memory.{name}": tuple(t.shape) for name, t in art_memory_for(config).state_dict().items()}
    layers, config.n_layer = config.n_layer, 1
    with torch.device("meta"):
        model = GPTBLMHeadModel(config)
    one_layer = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()} | memory
    tied = set(model.all_tied_weights_keys)
    block = {name[len(LAYER_PREFIX) :]: shape for name, shape in one_layer.items() if name.startswith(LAYER_PREFIX)}
    count = len(one_layer) - len(block) + layers * len(block)
    if count > 2 * saved + 1024:  # far more than the header holds: said from the counts, before listing names
        raise ValueError(
            f"{folder}/config.json describes {count - len(tied):,} tensors (n_layer={layers}) but its weights hold "
            f"{saved:,}: not the GPTB model its config describes; {HINT}"
        )
    shapes = {name: shape for name, shape in one_layer.items() if not name.startswith(LAYER_PREFIX)}
    for layer in range(layers):
        shapes.update({f"transformer.h.{layer}.{name}": shape for name, shape in block.items()})
    return shapes, tied


def check_model_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a Path if it holds a complete GPTB model; a ValueError saying what is wrong otherwise."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{folder} is not a folder: {HINT}")
    config = _read_config(path, folder)
    has_memory = (path / ART_MEMORY_FILE).is_file()
    if config["art_enabled"] and not has_memory:
        raise ValueError(f"{folder}/config.json enables the ART memory but the folder holds no {ART_MEMORY_FILE}")
    if has_memory and not config["art_enabled"]:
        raise ValueError(
            f"{folder} holds {ART_MEMORY_FILE} but its config.json says art_enabled: false, so the memory would be "
            f"dropped; set art_enabled to true or remove the file"
        )
    saved = _saved_shapes(path, folder)
    expected, tied = _expected_shapes(path, folder, len(saved))
    missing = sorted(set(expected) - set(saved) - tied)
    unexpected = sorted(set(saved) - set(expected))
    mismatched = sorted(name for name in set(saved) & set(expected) if saved[name] != expected[name])
    if missing or unexpected or mismatched:
        problems = [
            f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if names
        ]
        raise ValueError(
            f"the weights in {folder} are not those of the GPTB model its config.json describes: {'; '.join(problems)}"
        )
    return path
