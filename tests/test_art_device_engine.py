"""The device engine (`engine="device"`, docs/design.md#the-device-engine) against the one-at-a-time loop and the block
engine, on the CPU: the same code that runs on a GPU. And a guard that fails if a host synchronisation creeps in."""

import contextlib
import warnings

import pytest
import torch
from test_art_memory import (
    BAD_INPUTS,
    ReferenceART,
    assert_matches,
    assert_same_memory,
    assert_unchanged,
    clustered,
    random_splits,
    run_in_pieces,
    snapshot,
)

from modeling_gptb import art_device_engine
from modeling_gptb.art_device_engine import DeviceEngine
from modeling_gptb.art_memory import ART_ENGINES, ARTMemory, ARTOutput

pytestmark = pytest.mark.usefixtures("one_thread")  # many small operations: worker threads only spin


def small_integers(seed, n, dim, high=3):
    """Rows of small integers (0..high; in [0, 1] after / high for fuzzy): every sum is exact, ties are common."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high + 1, (n, dim), generator=g).double()


def quietly(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the capacity warning
        return fn(*args)


CASES = [
    # rule, data, vigilance, beta, max_categories
    ("cosine", "clustered", 0.9, None, 1024),
    ("cosine", "clustered", 0.97, 0.4, 40),  # fills up and rejects
    ("cosine", "clustered", 0.0, 0.5, 1024),  # everything resonates with category 0
    ("cosine", "integers", 0.8, 0.5, 1024),  # exact ties
    ("cosine", "integers", 0.95, 1.0, 12),
    ("fuzzy", "clustered", 0.8, None, 1024),
    ("fuzzy", "clustered", 0.9, 0.4, 40),
    ("fuzzy", "integers", 0.75, 0.5, 1024),
    ("fuzzy", "integers", 0.9, 1.0, 10),
]


def stream(rule, data, seed, n=160, dim=4):
    if data == "integers":
        rows = small_integers(seed, n, dim)
        return rows / 3 if rule == "fuzzy" else rows
    return clustered(seed, n, dim, 6, 0.35, unit=rule == "fuzzy")


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-v{c[2]}-b{c[3]}-cap{c[4]}" for c in CASES])
def test_device_engine_gives_the_loops_decisions_and_prototypes(case, seed):
    """float64 buffers: the loop's decisions, and its prototypes bit for bit (both apply `learn` row by row); fuzzy
    scores bit for bit where sums are exact (small integers), other scores within float64 rounding (summation order,
    and torch's CPU sqrt, which is not always correctly rounded in its vectorised path)."""
    rule, data, vigilance, beta, cap = case
    rows = stream(rule, data, seed)
    reference = ReferenceART(rule, vigilance, beta, max_categories=cap)
    expected = reference.update(rows)
    for sizes in ([rows.shape[0]], random_splits(rows.shape[0], seed)):
        memory = ARTMemory(4, rule, vigilance, beta, max_categories=cap, engine="device", dtype=torch.float64)
        output = quietly(run_in_pieces, memory, rows, sizes)
        assert_matches(output, expected, exact_scores=data == "integers" and rule == "fuzzy")
        assert_same_memory(memory, reference, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["cosine", "fuzzy"])
def test_device_engine_matches_the_block_engine_with_low_precision_buffers(rule, dtype):
    for data, vigilance in (("clustered", 0.9), ("integers", 0.8)):
        rows = stream(rule, data, 3, n=300, dim=8)
        memories = {
            engine: ARTMemory(8, rule, vigilance, max_categories=60, engine=engine, dtype=dtype)
            for engine in ("block", "device")
        }
        outputs = {engine: quietly(memory.update, rows.to(dtype)) for engine, memory in memories.items()}
        assert torch.equal(outputs["block"].category, outputs["device"].category)
        assert torch.equal(outputs["block"].status, outputs["device"].status)
        for field in ("similarity", "novelty"):  # a chain in a block: the block engine's closed form, 1e-16 apart
            torch.testing.assert_close(
                getattr(outputs["device"], field), getattr(outputs["block"], field), rtol=0, atol=1e-12
            )
        block, device = (memories[engine] for engine in ("block", "device"))
        assert torch.equal(block.num_committed, device.num_committed)
        assert torch.equal(block.category_counts, device.category_counts)
        assert torch.equal(block.novelty_histogram, device.novelty_histogram)
        # prototypes rounded once to the buffer dtype: equal, or one rounding step apart where float64 values differ
        torch.testing.assert_close(device.weight.double(), block.weight.double(), rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("rule", ["cosine", "fuzzy"])
@pytest.mark.parametrize("knobs", [(1, 1, 1, 0.0), (4, 1, 1, 0.0), (8, 3, 2, 0.0), (64, 2, 8, 1.0)])
def test_small_windows_and_shallow_chains_stay_exact(monkeypatch, rule, knobs):
    """Few rounds, shallow version chains and no slack: windows end early, the read finds rows left and queues more
    windows; the answer is still the loop's."""
    for name, value in zip(("window", "rounds", "depth", "slack"), knobs, strict=True):
        monkeypatch.setattr(DeviceEngine, name, value)
    reads = count_reads(monkeypatch)
    # Many close clusters in 3-D: decisions inside a window depend on each other all the time.
    rows = clustered(7, 200, 3, 10, 0.35, unit=rule == "fuzzy")
    vigilance = 0.97 if rule == "cosine" else 0.9
    reference = ReferenceART(rule, vigilance, 0.4, max_categories=50)
    expected = reference.update(rows)
    memory = ARTMemory(3, rule, vigilance, 0.4, max_categories=50, engine="device", dtype=torch.float64)
    assert_matches(quietly(memory.update, rows), expected)
    assert_same_memory(memory, reference, atol=0)
    if knobs[0] == 1:
        assert len(reads) == 1  # one row a window, so every window completes: no read but the last


# ---------------------------------------------------------------------------------------------------------------------
# No host synchronisation


def count_reads(monkeypatch):
    reads = []
    real = art_device_engine._read_back

    def read(values):
        reads.append(values.shape)
        with allowed():
            return real(values)

    monkeypatch.setattr(art_device_engine, "_read_back", read)
    return reads


_SYNCS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")
_guard = {"on": False}


@contextlib.contextmanager
def allowed():
    on, _guard["on"] = _guard["on"], False
    try:
        yield
    finally:
        _guard["on"] = on


@contextlib.contextmanager
def no_host_syncs():
    """Every way to read a tensor's values on the host raises, except inside `allowed()`."""
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCS}

    def guarded(name):
        def method(self, *args, **kwargs):
            if _guard["on"]:
                raise AssertionError(f"host synchronisation: Tensor.{name}")
            return originals[name](self, *args, **kwargs)

        return method

    for name in _SYNCS:
        setattr(torch.Tensor, name, guarded(name))
    _guard["on"] = True
    try:
        yield
    finally:
        _guard["on"] = False
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("rule", ["cosine", "fuzzy"])
def test_an_update_reads_the_device_once(monkeypatch, rule):
    """Steady state: a memory that knows the clusters, a stream that mostly resonates, a few new rows and, once the
    memory is full, rejections."""
    rows = clustered(1, 440, 16, 40, 0.1, unit=rule == "fuzzy")
    memories = [ARTMemory(16, rule, vigilance=0.9, max_categories=36, engine=engine) for engine in ("device", "block")]
    memory, block = memories
    for each in memories:
        quietly(each.update, rows[:40])  # outside the guard: the first rows fill the memory (36 of 40 clusters)
    expected = quietly(block.update, rows[40:])
    reads = count_reads(monkeypatch)
    with no_host_syncs():
        outputs = [quietly(memory.update, part) for part in rows[40:].split(100)]
    assert len(reads) == 4  # one per call
    assert (expected.status == 2).any() and (expected.status == 0).any()
    output = ARTOutput(*(torch.cat([getattr(o, name) for o in outputs]) for name in ARTOutput.__dataclass_fields__))
    assert torch.equal(output.category, expected.category) and torch.equal(output.status, expected.status)
    # The guard can fail: the block engine reads the device many times.
    memory.engine = "block"
    with pytest.raises(AssertionError, match="host synchronisation"), no_host_syncs():
        memory.update(rows[:10])


def test_a_memory_changed_from_outside_is_read_again():
    """The host's note of `num_committed` follows `load_state_dict` and `reset` (the tensor's version changes)."""
    rows = clustered(2, 60, 4, 4, 0.3)
    memory = ARTMemory(4, vigilance=0.9, engine="device", dtype=torch.float64)
    memory.update(rows[:30])
    state = {name: tensor.clone() for name, tensor in memory.state_dict().items()}
    after = memory.update(rows[30:])
    memory.reset()
    memory.update(rows[:5])
    memory.load_state_dict(state)
    again = memory.update(rows[30:])
    assert torch.equal(after.category, again.category) and torch.equal(after.status, again.status)


# ---------------------------------------------------------------------------------------------------------------------
# The switch, and bad input


def test_engine_switch():
    assert ART_ENGINES == ("auto", "block", "device")
    memory = ARTMemory(4)
    assert memory.engine == "auto" and not memory._device_engine()  # auto: the block engine until measured on a GPU
    memory.engine = "device"
    assert memory._device_engine()
    for bad in ("gpu", None, 1):
        with pytest.raises(ValueError, match=r"engine must be one of \['auto', 'block', 'device'\]"):
            ARTMemory(4, engine=bad)
        with pytest.raises(ValueError, match="engine must be one of"):
            memory.engine = bad
    assert memory.engine == "device"


@pytest.mark.parametrize("name", ["nan", "inf", "-inf", "wrong dim", "3-D", "bool", "fuzzy range", "too large"])
def test_bad_inputs_raise_and_change_nothing_on_the_device_engine(name):
    memory = ARTMemory(
        4,
        rule="fuzzy" if name == "fuzzy range" else "cosine",
        vigilance=0.8,
        max_categories=6,
        engine="device",
        dtype=torch.float16 if name == "too large" else torch.float32,
    )
    memory.update(clustered(0, 20, 4, 3, 0.3, unit=True))
    x, message = {
        "fuzzy range": (torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 1.1, 0.5]]), r"inputs in \[0, 1\].*1.1"),
        "too large": (torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 7e4, 0.3, 0.4]]), "float16.*row 1 does not"),
    }.get(name) or BAD_INPUTS[name]
    before = snapshot(memory)
    with pytest.raises(ValueError, match=message):
        quietly(memory.update, x)
    assert_unchanged(memory, before)
