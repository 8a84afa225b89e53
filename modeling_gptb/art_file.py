"""
The `art_memory.safetensors` file: safetensors with tensors `prototypes`, `counts` and `novelty_histogram` (from
format version 3 also the fitted input transform, the calibration and what describes each category:
`VERSION_3_TENSORS`; from version 4 the per-dimension scale of the `standardize` transform: `VERSION_4_TENSORS`; from
version 5 the outlier probe and two more calibration fields: `VERSION_5_TENSORS`), and
in its metadata the hyperparameters, the format version, optionally the sha256 of each weights file saved with the
memory (`weights_sha256`), and a checksum (`sha256`) over all of the metadata and the tensor data. Version 2 files
(written before the input transform existed) load as memories with `input_transform="none"`, uncalibrated; version 3
files (before `standardize`) with a per-dimension scale of ones, version 3 and 4 files without an outlier probe.
Design: `docs/design.md#art_memorysafetensors`.
"""

import hashlib
import json
import os
import struct
import uuid

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .art_rules import ART_RULES, _check_alpha, _check_int, _check_rule, _check_unit
from .configuration_gptb import ART_INPUT_TRANSFORMS, art_rule_dim

ART_MEMORY_FILE = "art_memory.safetensors"
ART_FORMAT = "gptb-art-memory"
ART_FORMAT_VERSION = 5
# Tensors a version 3 file adds (k: categories, d: dim): name -> (dtype, shape from k and d). Their values are checked
# as far as a reader relies on them; NaN in `calibration` means "not calibrated".
VERSION_3_TENSORS = {
    "input_center": (torch.float, lambda k, d: (d,)),
    "input_scale": (torch.float, lambda k, d: (1,)),
    "calibration": (torch.float, lambda k, d: (9,)),
    "calibration_quantiles": (torch.float, lambda k, d: (2, 101)),
    "rows_seen": (torch.long, lambda k, d: (1,)),
    "category_created": (torch.long, lambda k, d: (k,)),
    "category_exemplars": (torch.long, lambda k, d: (k, 16)),
}
# Version 4 adds the `standardize` transform's per-dimension scale (ones for the other transforms).
VERSION_4_TENSORS = {"input_dim_scale": (torch.float, lambda k, d: (d,))}
# Version 5 adds the outlier probe (center, scale, weight rows; scale 0: not fitted) and its bias, and the calibration
# grows from 9 fields to 11 (the probe score's mean and standard deviation; its score field may then be 2, "outliers").
VERSION_5_TENSORS = {
    "outlier_probe": (torch.float, lambda k, d: (3, d)),
    "outlier_bias": (torch.float, lambda k, d: (1,)),
    "calibration": (torch.float, lambda k, d: (11,)),
}
# The input transforms each version's `input_transform` may name.
_FILE_TRANSFORMS = {"3": ("none", "center", "euclidean"), "4": ART_INPUT_TRANSFORMS, "5": ART_INPUT_TRANSFORMS}
_DEFAULT_LIFT = 4.0
# The novelty of every row a memory learned from, counted in NOVELTY_BINS equal bins over [0, NOVELTY_RANGE].
NOVELTY_BINS, NOVELTY_RANGE = 2000, 2.0


def _data_section(data: bytes) -> bytes:
    (header_len,) = struct.unpack("<Q", data[:8])
    return data[8 + header_len :]


def _atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, flushed to disk, then renamed over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX; not possible on every platform)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def encode_art_file(config: dict, tensors: dict[str, torch.Tensor], weights_sha256: dict | None = None) -> bytes:
    """
    The bytes of an ART file holding `tensors` (`prototypes`, `counts`) and the hyperparameters in `config`;
    `weights_sha256` (file name -> sha256) names the weights files the memory was saved with, if any.
    """
    metadata = {
        "format": ART_FORMAT,
        "format_version": str(ART_FORMAT_VERSION),
        "rule": config["rule"],
        "dim": str(config["dim"]),
        "vigilance": repr(config["vigilance"]),
        "beta": repr(config["beta"]),
        "alpha": repr(config["alpha"]),
        "max_categories": str(config["max_categories"]),
        "num_categories": str(config["num_categories"]),
        "input_transform": config["input_transform"],
        "lift": repr(config["lift"]),
    }
    if weights_sha256:
        metadata["weights_sha256"] = json.dumps(weights_sha256, sort_keys=True)
    # The data section does not depend on the metadata: lay it out once without, then store the checksum.
    metadata["sha256"] = _checksum(metadata, _data_section(safetensors_save(tensors)))
    return safetensors_save(tensors, metadata)


def _checksum(metadata: dict, data_section: bytes) -> str:
    """sha256 of every metadata field but the checksum itself (as sorted, compact JSON), then the tensor data."""
    fields = {key: value for key, value in metadata.items() if key != "sha256"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(canonical + data_section).hexdigest()


def _parse_weights_sha256(value: str) -> dict[str, str]:
    names = json.loads(value)
    if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ValueError("expected a JSON object of file name -> sha256")
    for name in names:  # a path would make the loader read (and hash) a file outside the model's folder
        if os.path.basename(name) != name or "\\" in name or not name.endswith(".safetensors"):
            raise ValueError(f"{name!r} is not the name of a .safetensors weights file in the model's folder")
    return names


class UnpairedARTFileWarning(UserWarning):
    """An ART file that names no weights (saved by `ARTMemory.save_pretrained` alone) loaded beside a model's."""


_METADATA_FIELDS = {
    "rule": _check_rule,
    "dim": lambda v: _check_int("dim", int(v)),
    "vigilance": lambda v: _check_unit("vigilance", float(v)),
    "beta": lambda v: _check_unit("beta", float(v)),
    "alpha": lambda v: _check_alpha(float(v)),
    "max_categories": lambda v: _check_int("max_categories", int(v)),
    "num_categories": lambda v: _check_int("num_categories", int(v), minimum=0),
}
_OPTIONAL_FIELDS = {"weights_sha256": _parse_weights_sha256}


def _version_3_fields(version: str) -> dict:
    """The metadata fields from version 3 on: the input transform (those `version` knows) and the lift."""
    return {
        "input_transform": lambda v: _check_choice("input_transform", v, _FILE_TRANSFORMS[version]),
        "lift": lambda v: _check_alpha(float(v), "lift"),
    }


def _check_choice(name: str, value: str, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}")
    return value


def load_art_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """
    Read and check an `art_memory.safetensors` file.

    Returns `(config, tensors)`: `config` holds rule, dim, vigilance, beta, alpha, max_categories, num_categories and
    weights_sha256 (None when the file names no weights); `tensors` the `prototypes` (num_categories, stored_dim),
    `counts` (num_categories,) and `novelty_histogram` (NOVELTY_BINS,). Anything damaged, truncated, missing or
    inconsistent raises `ValueError` naming the file and the problem. Only the file's own tensors are allocated,
    whatever sizes its metadata claims.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()

    def problem(message: str) -> ValueError:
        return ValueError(f"{path}: {message}")

    if len(data) < 8:
        raise problem(f"not a safetensors file (only {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise problem("truncated, or not a safetensors file: its header runs past the end of the file")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError):  # JSON and UTF-8 decoding errors; nesting deeper than Python's stack
        header = None
    if not isinstance(header, dict):
        raise problem("not a safetensors file: unreadable header")
    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise problem(f"damaged or truncated safetensors file ({exc})") from None
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != ART_FORMAT:
        raise problem(f"not an ARTMemory file: its metadata has no format={ART_FORMAT!r}")
    version = metadata.get("format_version")
    if version == "1":
        raise problem(
            "format version 1, whose checksum does not cover the hyperparameters, so they cannot be verified; "
            f"this code reads versions 2 to {ART_FORMAT_VERSION} only"
        )
    if version not in ("2", "3", "4", str(ART_FORMAT_VERSION)):
        raise problem(
            f"unsupported format version {version!r} (this code reads versions 2 to {ART_FORMAT_VERSION}); upgrade "
            "the code that reads it"
        )
    fields = dict(_METADATA_FIELDS) | (_version_3_fields(version) if version != "2" else {})
    missing = [key for key in (*fields, "sha256") if key not in metadata]
    if missing:
        raise problem(f"metadata lacks {missing}")
    if _checksum(metadata, _data_section(data)) != metadata["sha256"]:
        raise problem("checksum mismatch: the metadata or the tensor data is damaged")
    config = dict.fromkeys(_OPTIONAL_FIELDS) | {"input_transform": "none", "lift": _DEFAULT_LIFT}
    for key, parse in (*fields.items(), *_OPTIONAL_FIELDS.items()):
        if key not in metadata:
            continue
        try:
            config[key] = parse(metadata[key])
        except ValueError as exc:
            raise problem(f"bad metadata {key}={metadata[key]!r}: {exc}") from None

    added = _added_tensors(version)
    expected_names = sorted(["counts", "novelty_histogram", "prototypes", *added])
    if sorted(tensors) != expected_names:
        raise problem(f"expected tensors {expected_names}, found {sorted(tensors)}")
    histogram = tensors["novelty_histogram"]
    if histogram.dtype != torch.long or tuple(histogram.shape) != (NOVELTY_BINS,) or histogram.min() < 0:
        raise problem(
            f"novelty_histogram is {histogram.dtype} of shape {tuple(histogram.shape)}; expected non-negative int64 "
            f"counts of shape ({NOVELTY_BINS},)"
        )
    prototypes, counts = tensors["prototypes"], tensors["counts"]
    k = config["num_categories"]
    expected = (k, ART_RULES[config["rule"]]().stored_dim(art_rule_dim(config["dim"], config["input_transform"])))
    if not prototypes.is_floating_point() or tuple(prototypes.shape) != expected:
        raise problem(
            f"prototypes are {prototypes.dtype} of shape {tuple(prototypes.shape)}; expected floats of shape "
            f"{expected} for {k} categories, rule {config['rule']!r} and dim {config['dim']}"
        )
    if counts.dtype != torch.long or tuple(counts.shape) != (k,):
        raise problem(f"counts are {counts.dtype} of shape {tuple(counts.shape)}; expected int64 of shape ({k},)")
    if k > config["max_categories"]:
        raise problem(f"{k} categories exceed max_categories={config['max_categories']}")
    if k and (counts.min() < 1 or not torch.isfinite(prototypes).all()):
        raise problem("categories with a count below 1 or non-finite prototypes")
    if k and config["rule"] == "fuzzy" and (prototypes.min() < 0 or prototypes.max() > 1):
        raise problem("fuzzy prototypes outside [0, 1]")
    if config["input_transform"] != "none" and config["rule"] != "cosine":
        raise problem(f"input_transform {config['input_transform']!r} with rule {config['rule']!r}; it needs 'cosine'")
    if added:
        _check_added_tensors(tensors, added, k, config["dim"], problem)
    dim_scale = tensors.get("input_dim_scale")
    if dim_scale is not None and config["input_transform"] != "standardize" and not (dim_scale == 1).all():
        raise problem(f"input_dim_scale must be all ones for input_transform {config['input_transform']!r}")
    return config, tensors


def _added_tensors(version: str) -> dict:
    """The tensors a file of `version` holds beyond version 2's, by name (see `VERSION_3_TENSORS`)."""
    return {"2": {}, "3": VERSION_3_TENSORS, "4": VERSION_3_TENSORS | VERSION_4_TENSORS}.get(
        version, VERSION_3_TENSORS | VERSION_4_TENSORS | VERSION_5_TENSORS
    )


def _check_added_tensors(tensors: dict, added: dict, k: int, dim: int, problem) -> None:
    for name, (kind, shape_of) in added.items():
        tensor, shape = tensors[name], shape_of(k, dim)
        right_kind = tensor.is_floating_point() if kind == torch.float else tensor.dtype == torch.long
        if not right_kind or tuple(tensor.shape) != shape:
            what = "floats" if kind == torch.float else "int64"
            raise problem(f"{name} is {tensor.dtype} of shape {tuple(tensor.shape)}; expected {what} of shape {shape}")
    if not torch.isfinite(tensors["input_center"]).all() or not tensors["input_scale"][0] >= 0:
        raise problem("input_center must be finite and input_scale >= 0")
    if tensors["rows_seen"][0] < 0 or (tensors["category_exemplars"] < -1).any():
        raise problem("rows_seen must be >= 0 and category_exemplars token ids >= -1")
    dim_scale = tensors.get("input_dim_scale")
    if dim_scale is not None and not (torch.isfinite(dim_scale).all() and (dim_scale > 0).all()):
        raise problem("input_dim_scale must be finite and > 0 in every dimension")
    probe, calibration = tensors.get("outlier_probe"), tensors["calibration"]
    fitted = probe is not None and bool(probe[1].any())
    if probe is not None and not (torch.isfinite(probe).all() and torch.isfinite(tensors["outlier_bias"]).all()):
        raise problem("outlier_probe and outlier_bias must be finite")
    unfitted_zeros = probe is not None and not probe.any() and not tensors["outlier_bias"].any()
    if probe is not None and not ((probe[1] > 0).all() if fitted else unfitted_zeros):
        raise problem("outlier_probe's scale row must be > 0 in every dimension (fitted) or the probe all zeros")
    scores = (0, 1, 2) if fitted else (0, 1)  # the score field: novelty, combined, outliers (needs the probe)
    if not torch.isfinite(calibration).all() or float(calibration[8]) not in scores:
        raise problem(f"calibration must be finite with its score field (index 8) one of {list(scores)}")


# ---------------------------------------------------------------------------------------------------------------------
# The weights an ART file belongs to: a model saves its weights, then its memory; a kill in between must not leave a
# pair that loads as one model.


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def weights_files(locate, variant: str | None = None) -> list[str]:
    """The weights files a load reads (`locate(name)` gives a file's path, or None), picked as transformers picks
    them: `model.safetensors`, else the shards its `model.safetensors.index.json` names (with `variant` in the names,
    as transformers puts it)."""

    def name(base: str) -> str:
        return base.replace(".safetensors", f".{variant}.safetensors") if variant else base

    if locate(name("model.safetensors")) is not None:
        return [name("model.safetensors")]
    index = locate(name("model.safetensors.index.json"))
    if index is None:
        return []
    with open(index, encoding="utf-8") as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def saved_weights_sha256(folder: str | os.PathLike, variant: str | None = None) -> dict[str, str]:
    """sha256 of each weights file a load of `folder` reads (see `weights_files`)."""

    def locate(name: str) -> str | None:
        path = os.path.join(folder, name)
        return path if os.path.isfile(path) else None

    return {file: file_sha256(os.path.join(folder, file)) for file in weights_files(locate, variant)}


def check_weights_sha256(
    art_path: str, weights_sha256: dict[str, str] | None, locate, variant: str | None = None
) -> bool:
    """Raise `ValueError` unless the ART file at `art_path` names every weights file this load reads and each file it
    names is there (`locate(name)` gives its path, or None) with the recorded sha256. False for an ART file that names
    no weights (not paired: nothing to check)."""
    if weights_sha256 is None:
        return False
    unchecked = [name for name in weights_files(locate, variant) if name not in weights_sha256]
    if unchecked:
        raise ValueError(
            f"{art_path} was saved with {', '.join(sorted(weights_sha256))}, not with {', '.join(unchecked)}, which "
            "this load reads: it belongs to other weights; save the model again"
        )
    for name, expected in weights_sha256.items():
        path = locate(name)
        if path is None:
            raise ValueError(f"{art_path} was saved with {name}, which is missing beside it")
        if file_sha256(path) != expected:
            raise ValueError(
                f"{art_path} belongs to other weights than {path} (sha256 {expected[:12]}... recorded, "
                f"{file_sha256(path)[:12]}... found): a save was interrupted between the two files, or one was "
                "replaced; save the model again"
            )
    return True
