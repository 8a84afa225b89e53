"""Issue 11 for the ART memory: no silent wrong memory, no unbounded load. Each test reproduces a reported fault."""

import hashlib
import json
import struct
import threading
from copy import deepcopy

import pytest
import torch
from safetensors.torch import save as safetensors_save

from modeling_gptb.art_memory import ART_MEMORY_FILE, ARTMemory, load_art_file


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


# -- item 5: what a load allocates follows from the file, or is refused before anything is allocated


def test_a_small_file_claiming_a_huge_memory_is_refused_before_allocating(tmp_path):
    """The reported file: a few bytes whose metadata says dim=1024, max_categories=1048576 (8.5 GB of buffers)."""
    path = tmp_path / ART_MEMORY_FILE
    empty = {
        "prototypes": torch.zeros(0, 2048),
        "counts": torch.zeros(0, dtype=torch.long),
        "novelty_histogram": torch.zeros(2000, dtype=torch.long),
    }
    hyper = {"rule": "fuzzy", "vigilance": "0.75", "beta": "1.0", "alpha": "0.001", "num_categories": "0"}
    path.write_bytes(art_file(empty, dim="1024", max_categories="1048576", **hyper))
    assert path.stat().st_size < 20_000  # the empty novelty histogram is most of it
    with pytest.raises(ValueError, match=r"need 8,740,929,536 bytes of buffers, above max_buffer_bytes=1,073,741,824"):
        ARTMemory.from_pretrained(path)
    # Sizes the allocator itself would refuse give the same clear error.
    path.write_bytes(
        art_file({**empty, "prototypes": torch.zeros(0, 2**41)}, dim=str(2**40), max_categories="8", **hyper)
    )
    with pytest.raises(ValueError, match="above max_buffer_bytes"):
        ARTMemory.from_pretrained(path)


def test_the_caller_can_raise_the_bound(tmp_path):
    # 16 categories of 5 float32 features, plus per category an int64 count, creation step and 16 exemplar tokens
    memory, path = saved(tmp_path)
    with pytest.raises(ValueError, match="need 2,624 bytes of buffers, above max_buffer_bytes=2,623; pass a larger"):
        ARTMemory.from_pretrained(tmp_path, max_buffer_bytes=2623)
    assert torch.equal(ARTMemory.from_pretrained(tmp_path, max_buffer_bytes=2624).weight, memory.weight)


def test_a_deeply_nested_header_gives_value_error_not_recursion_error(tmp_path):
    path = tmp_path / ART_MEMORY_FILE
    header = b'{"__metadata__":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    for load in (ARTMemory.from_pretrained, load_art_file):
        with pytest.raises(ValueError, match="not a safetensors file: unreadable header"):
            load(path)


# -- item 9: rows that do not fit the prototypes' dtype are refused like NaN rows


@pytest.mark.parametrize(
    "dtype, value, rows",
    [
        (torch.float32, 1e39, torch.float64),  # the report: float32 buffers stored inf
        (torch.float16, 1e5, torch.float32),  # the same with a float16 memory
        (torch.bfloat16, 1e39, torch.float64),
    ],
)
@pytest.mark.parametrize("method", ["update", "classify"])
def test_rows_that_overflow_the_prototypes_are_refused_with_the_memory_unchanged(tmp_path, dtype, value, rows, method):
    memory = ARTMemory(4, max_categories=8, dtype=dtype)
    memory.update(torch.randn(3, 4))
    before = [tensor.clone() for tensor in (memory.weight, memory.category_counts, memory.num_committed)]
    x = torch.randn(3, 4, dtype=rows)
    x[1] = value
    with pytest.raises(ValueError, match=rf"inputs must fit the prototypes' dtype {dtype} .* row 1 does not"):
        getattr(memory, method)(x)
    after = (memory.weight, memory.category_counts, memory.num_committed)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.isfinite(memory.weight).all()
    # what does fit is learned, and the file saved afterwards loads
    x[1] = torch.finfo(dtype).max / 2
    memory.update(x)
    assert torch.isfinite(memory.weight).all()
    memory.save_pretrained(tmp_path)
    assert ARTMemory.from_pretrained(tmp_path).num_categories == memory.num_categories


# -- item 11: the memory keeps its own dtype whatever the model's


@pytest.mark.parametrize("memory_dtype", [torch.float32, torch.float64])
def test_casting_a_parent_module_keeps_the_prototypes_dtype_and_bits(memory_dtype):
    parent = torch.nn.ModuleDict({"head": torch.nn.Linear(4, 4), "art": ARTMemory(4, dtype=memory_dtype)})
    parent["art"].update(torch.randn(20, 4, dtype=torch.float64) * 1e-3)  # values bf16 would round
    learned = parent["art"].weight.clone()
    for cast in (
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.float(),
        lambda m: m.double(),
        lambda m: m.to("cpu", torch.float16),
    ):
        cast(parent)
        assert parent["art"].weight.dtype == memory_dtype and torch.equal(parent["art"].weight, learned)
        assert parent["art"].category_counts.dtype == torch.long
    assert parent["head"].weight.dtype == torch.float16  # the rest of the model did follow
    assert ARTMemory(4).to(torch.bfloat16).weight.dtype == torch.float32


def test_a_bf16_gptb_model_keeps_and_saves_float32_prototypes(tmp_path):
    from conftest import tiny_model

    from modeling_gptb import GPTBLMHeadModel

    model = tiny_model(art_enabled=True).train()
    model(torch.randint(0, 50, (6, 5)))
    learned = model.art_memory.prototypes.clone()
    assert learned.dtype == torch.float32 and len(learned)
    model.to(torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.art_memory.weight.dtype == torch.float32 and torch.equal(model.art_memory.prototypes, learned)
    model.save_pretrained(tmp_path)
    _, tensors = load_art_file(tmp_path / ART_MEMORY_FILE)
    assert tensors["prototypes"].dtype == torch.float32 and torch.equal(tensors["prototypes"], learned)
    for dtype in (torch.bfloat16, torch.float32):
        loaded = GPTBLMHeadModel.from_pretrained(tmp_path, dtype=dtype)
        assert loaded.art_memory.weight.dtype == torch.float32 and torch.equal(loaded.art_memory.prototypes, learned)


# -- item 2: a save killed between model.safetensors and art_memory.safetensors does not load as one model

SAVE_THEN_PAUSE = """
import sys, time, torch
sys.path.insert(0, sys.argv[2])
from conftest import tiny_model
from modeling_gptb.art_memory import ARTMemory

model = tiny_model(seed=1, art_enabled=True).train()
model(torch.randint(0, 50, (6, 5), generator=torch.Generator().manual_seed(1)))

def pause_before_the_art_file(self, *args, **kwargs):  # the parent SIGKILLs the process here
    print("weights written", flush=True)
    time.sleep(600)

ARTMemory.save_pretrained = pause_before_the_art_file
model.save_pretrained(sys.argv[1])
"""


def trained_gptb(seed=0):
    from conftest import tiny_model

    model = tiny_model(seed=seed, art_enabled=True).train()
    model(torch.randint(0, 50, (6, 5), generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def test_a_save_killed_between_the_weights_and_the_art_file_does_not_load(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from modeling_gptb import GPTBLMHeadModel

    folder = tmp_path / "model"
    old = trained_gptb()
    old.save_pretrained(folder)
    old_weights, old_art = ((folder / name).read_bytes() for name in ("model.safetensors", ART_MEMORY_FILE))
    assert GPTBLMHeadModel.from_pretrained(folder).art_memory.num_categories == old.art_memory.num_categories

    script = tmp_path / "save_then_pause.py"
    script.write_text(SAVE_THEN_PAUSE)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder), tests_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "weights written", line + proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # the mixed folder: the new weights beside the old memory
    assert (folder / "model.safetensors").read_bytes() != old_weights
    assert (folder / ART_MEMORY_FILE).read_bytes() == old_art
    with pytest.raises(ValueError) as error:
        GPTBLMHeadModel.from_pretrained(folder)
    message = str(error.value)
    assert str(folder / ART_MEMORY_FILE) in message and str(folder / "model.safetensors") in message
    assert "belongs to other weights" in message

    # A whole save afterwards loads again, as one model.
    new = trained_gptb(seed=1)
    new.save_pretrained(folder)
    loaded = GPTBLMHeadModel.from_pretrained(folder)
    assert torch.equal(loaded.art_memory.prototypes, new.art_memory.prototypes)


def test_the_art_file_names_the_weights_it_was_saved_with(tmp_path):
    import hashlib

    model = trained_gptb()
    model.save_pretrained(tmp_path)
    config, _ = load_art_file(tmp_path / ART_MEMORY_FILE)
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert config["weights_sha256"] == {"model.safetensors": digest}
    # a memory saved on its own names no weights, and loads anywhere
    assert load_art_file(model.art_memory.save_pretrained(tmp_path / "alone"))[0]["weights_sha256"] is None


# ---------------------------------------------------------------------------------------------------------------------
# Issue 21 item 3: a load casts the stored prototypes only where the cast is exact


def float64_memory(tmp_path, value: float) -> tuple[ARTMemory, str]:
    memory = ARTMemory(2, vigilance=0.5, max_categories=4, dtype=torch.float64)
    memory.update(torch.tensor([[value, 1.0]], dtype=torch.float64))
    return memory, memory.save_pretrained(tmp_path / "float64")


@pytest.mark.parametrize(
    "value, dtype, problem",
    [
        (1e300, torch.float32, "1 value overflows"),  # was loaded as inf
        (1e5, torch.float16, "1 value overflows"),  # 1e5 > float16's 65504
        (0.1, torch.float32, "would be rounded"),  # was rounded silently
    ],
)
def test_a_load_that_would_overflow_or_round_the_prototypes_is_refused(tmp_path, value, dtype, problem):
    stored, path = float64_memory(tmp_path, value)
    with pytest.raises(
        ValueError, match=f"torch.float64 prototypes do not fit {dtype}.*{problem}.*dtype=torch.float64"
    ):
        ARTMemory.from_file(path, dtype=dtype)
    target = ARTMemory(2, vigilance=0.5, max_categories=4, dtype=dtype)
    before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    with pytest.raises(ValueError, match=problem):
        target.load_file(path)
    assert all(torch.equal(target.state_dict()[name], tensor) for name, tensor in before.items())  # unchanged
    # exact casts load, bit for bit: the stored dtype itself, and a widening one
    assert torch.equal(ARTMemory.from_file(path).prototypes, stored.prototypes)
    small, small_path = float64_memory(tmp_path / "small", 0.5)
    widened = ARTMemory.from_file(
        ARTMemory.from_file(small_path, dtype=torch.float32).save_pretrained(tmp_path / "f32")
    )
    assert torch.equal(
        ARTMemory.from_file(tmp_path / "f32" / ART_MEMORY_FILE, dtype=torch.float64).prototypes, small.prototypes
    )
    assert widened.prototypes.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# Issue 21 item 5: updates from several threads are serialised, none lost


def test_updates_from_two_threads_lose_nothing():
    memory = ARTMemory(8, vigilance=0.99, max_categories=1024)
    rows = torch.randn(2, 200, 8, generator=torch.Generator().manual_seed(0))  # pairwise far apart: 400 new categories
    start = threading.Barrier(2)

    def learn(part):
        start.wait()
        for row in part:
            memory.update(row[None])

    threads = [threading.Thread(target=learn, args=(rows[i],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert memory.num_categories == 400
    assert int(memory.counts.sum()) == 400 and int(memory.novelty_histogram.sum()) == 400
    # each row is its own category, stored exactly once
    stored = {tuple(row.tolist()) for row in memory.prototypes}
    assert len(stored) == 400
    copy = deepcopy(memory)  # the lock does not stop a copy (or a pickle) of the memory
    assert torch.equal(copy.prototypes, memory.prototypes)


# ---------------------------------------------------------------------------------------------------------------------
# Issue 21 item 11: weights_sha256 names files in the model's folder, including the weights a load reads


def art_file_naming(memory: ARTMemory, weights_sha256: dict) -> bytes:
    """The memory's file as save_pretrained writes it, naming `weights_sha256` (a valid checksum: not damage)."""
    return memory._to_bytes(weights_sha256)


@pytest.mark.parametrize("name", ["/etc/hostname", "../other/config.json", "sub/model.safetensors", "config.json"])
def test_weights_sha256_naming_a_path_or_a_non_weights_file_is_refused(tmp_path, name):
    from modeling_gptb import GPTBLMHeadModel

    folder = tmp_path / "model"
    model = trained_gptb()
    model.save_pretrained(folder)
    (folder / ART_MEMORY_FILE).write_bytes(art_file_naming(model.art_memory, {name: "0" * 64}))
    with pytest.raises(ValueError, match=f"bad metadata weights_sha256=.*{name!r} is not the name of a .safetensors"):
        load_art_file(folder / ART_MEMORY_FILE)
    with pytest.raises(ValueError, match="is not the name of a .safetensors weights file in the model's folder"):
        GPTBLMHeadModel.from_pretrained(folder)


def test_an_art_file_that_does_not_name_the_weights_the_load_reads_is_refused(tmp_path):
    import hashlib

    from modeling_gptb import GPTBLMHeadModel

    folder = tmp_path / "model"
    model = trained_gptb()
    model.save_pretrained(folder)
    decoy = folder / "decoy.safetensors"  # present, with the recorded hash: model.safetensors itself was never checked
    decoy.write_bytes(b"decoy")
    names = {"decoy.safetensors": hashlib.sha256(b"decoy").hexdigest()}
    (folder / ART_MEMORY_FILE).write_bytes(art_file_naming(model.art_memory, names))
    with pytest.raises(ValueError, match="saved with decoy.safetensors, not with model.safetensors, which this load"):
        GPTBLMHeadModel.from_pretrained(folder)


def test_an_unpaired_art_file_beside_weights_loads_with_a_warning(tmp_path, capsys):
    from test_cli import save_model_folder

    from modeling_gptb import GPTBLMHeadModel, cli
    from modeling_gptb.art_memory import UnpairedARTFileWarning

    folder = save_model_folder(tmp_path / "model")  # with a byte tokenizer, for the CLI
    memory = GPTBLMHeadModel.from_pretrained(folder).art_memory
    memory.save_pretrained(folder)  # on its own: names no weights
    with pytest.warns(UnpairedARTFileWarning, match="names no weights .* save the model with model.save_pretrained"):
        loaded = GPTBLMHeadModel.from_pretrained(folder)
    assert torch.equal(loaded.art_memory.prototypes, memory.prototypes)
    assert cli.main(["art-report", str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.count("gptb: warning:") == 1 and "names no weights" in err


@pytest.mark.parametrize("rule, transform", [("cosine", "none"), ("cosine", "euclidean"), ("fuzzy", "none")])
def test_the_buffer_bound_counts_every_per_category_buffer(rule, transform):
    # What ART_MAX_BUFFER_BYTES bounds must be what a memory of that capacity allocates per category, the exemplar
    # and creation buffers included (they grow with max_categories as the prototypes do).
    from modeling_gptb.configuration_gptb import art_buffer_bytes

    capacity, dim = 7, 5
    memory = ARTMemory(dim, rule=rule, max_categories=capacity, input_transform=transform)
    per_category = sum(
        buffer.numel() * buffer.element_size()
        for buffer in memory.buffers()
        if buffer.dim() >= 1 and buffer.shape[0] == capacity
    )
    assert per_category == art_buffer_bytes(capacity, memory.weight.shape[1], memory.weight.element_size())
