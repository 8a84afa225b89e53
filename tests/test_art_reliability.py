"""Issue 11 for the ART memory: no silent wrong memory, no unbounded load. Each test reproduces a reported fault."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save as safetensors_save

from modeling_gptb.art_memory import ARTMemory, load_art_file


def header_of(data: bytes) -> dict:
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])


def checksum(metadata: dict, tensors: dict) -> str:
    """The format's checksum, written out here: sha256 of the sorted compact JSON of the metadata (less `sha256`)
    followed by the tensor data section."""
    body = safetensors_save(tensors)
    data_section = body[8 + struct.unpack("<Q", body[:8])[0] :]
    fields = {key: value for key, value in metadata.items() if key != "sha256"}
    return hashlib.sha256(
        json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + data_section
    ).hexdigest()


def art_file(tensors: dict, **metadata) -> bytes:
    """An ART file with these tensors and metadata and a checksum that matches them."""
    metadata = {"format": "gptb-art-memory", "format_version": "2", **metadata}
    metadata["sha256"] = checksum(metadata, tensors)
    return safetensors_save(tensors, metadata)


def saved(tmp_path) -> tuple[ARTMemory, str]:
    memory = ARTMemory(5, vigilance=0.7, beta=0.25, alpha=0.01, max_categories=16)
    memory.update(torch.randn(40, 5, generator=torch.Generator().manual_seed(0)))
    return memory, memory.save_pretrained(tmp_path)


# -- item 6: the checksum covers every metadata field that changes behaviour


@pytest.mark.parametrize(
    "old, new",
    [
        (b'"beta":"0.25"', b'"beta":"0.35"'),
        (b'"vigilance":"0.7"', b'"vigilance":"0.6"'),
        (b'"alpha":"0.01"', b'"alpha":"0.02"'),
        (b'"max_categories":"16"', b'"max_categories":"17"'),
    ],
)
def test_an_edited_hyperparameter_is_refused(tmp_path, old, new):
    memory, path = saved(tmp_path)
    data = open(path, "rb").read()
    assert data.count(old) == 1
    open(path, "wb").write(data.replace(old, new))  # same length: the header stays well formed
    for load in (
        ARTMemory.from_pretrained,
        load_art_file,
        ARTMemory(5, vigilance=0.7, beta=0.25, alpha=0.01).load_file,
    ):
        with pytest.raises(ValueError, match="checksum mismatch: the metadata or the tensor data is damaged"):
            load(path)


def test_a_version_1_file_whose_checksum_skips_the_metadata_is_refused(tmp_path):
    _, path = saved(tmp_path)
    data = open(path, "rb").read()
    metadata = header_of(data)["__metadata__"]
    _, tensors = load_art_file(path)
    body = safetensors_save(tensors)
    metadata.update(
        format_version="1", sha256=hashlib.sha256(body[8 + struct.unpack("<Q", body[:8])[0] :]).hexdigest()
    )
    open(path, "wb").write(safetensors_save(tensors, metadata))
    with pytest.raises(ValueError, match="format version 1, whose checksum does not cover the hyperparameters"):
        ARTMemory.from_pretrained(path)
