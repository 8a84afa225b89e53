"""ARTMemory against docs/design.md#artmemory written as a plain loop: one row at a time, a Python list of float64
prototypes. The memory must give the loop's categories and statuses exactly, and its prototypes up to rounding."""

import json
import math
import os
import struct
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save
from test_art_reliability import checksum
from torch import nn

from modeling_gptb import art_memory
from modeling_gptb.art_memory import (
    ART_MEMORY_FILE,
    ART_RULES,
    ARTMemory,
    ARTOutput,
    ARTRule,
    ARTStatus,
    CosineRule,
    load_art_file,
    to_unit_interval,
)

# ---------------------------------------------------------------------------------------------------------------------
# The reference: docs/design.md#artmemory read literally


def reference_cosine(x, w):
    # torch's float64 sqrt, like the memory: on CPU it is not always correctly rounded (about 1% of inputs come out
    # one ulp away from math.sqrt), and exact ties must be compared in the same arithmetic.
    xx, ww = float(x @ x), float(w @ w)
    return float(x @ w) / float(torch.tensor(xx * ww, dtype=torch.float64).sqrt()) if xx * ww > 0 else 0.0


class ReferenceART:
    """The one-at-a-time loop over a Python list of float64 prototypes."""

    def __init__(self, rule="cosine", vigilance=0.75, beta=None, alpha=1e-3, max_categories=1024):
        self.rule, self.vigilance, self.alpha, self.max_categories = rule, vigilance, alpha, max_categories
        self.beta = (0.5 if rule == "cosine" else 1.0) if beta is None else beta
        self.prototypes, self.counts = [], []

    def prepare(self, x):
        x = x.double()
        return x if self.rule == "cosine" else torch.cat([x, 1 - x])

    def decide(self, i):
        """(winner or None, similarity, best) for one prepared input."""
        if not self.prototypes:
            return None, 0.0, 0.0
        if self.rule == "cosine":
            scores = [reference_cosine(i, w) for w in self.prototypes]
            best = max(scores)
            winner = scores.index(best)  # the lowest index among ties
            return (winner if best >= self.vigilance else None), best, best
        overlap = [float(torch.minimum(i, w).sum()) for w in self.prototypes]
        choice = [o / (self.alpha + float(w.sum())) for o, w in zip(overlap, self.prototypes, strict=True)]
        match = [o / float(i.sum()) for o in overlap]
        for j in sorted(range(len(choice)), key=lambda j: (-choice[j], j)):  # decreasing choice, lowest index first
            if match[j] >= self.vigilance:
                return j, match[j], max(match)
        return None, max(match), max(match)

    def update(self, rows):
        out = {"category": [], "status": [], "similarity": [], "novelty": []}
        for x in rows:
            i = self.prepare(x)
            winner, similarity, best = self.decide(i)
            if winner is not None:
                w = self.prototypes[winner]
                if self.rule == "cosine":
                    self.prototypes[winner] = (1 - self.beta) * w + self.beta * i
                else:
                    self.prototypes[winner] = self.beta * torch.minimum(i, w) + (1 - self.beta) * w
                self.counts[winner] += 1
                category, status = winner, ARTStatus.RESONATED
            elif len(self.prototypes) < self.max_categories:
                self.prototypes.append(i.clone())
                self.counts.append(1)
                category, status = len(self.prototypes) - 1, ARTStatus.NEW
            else:
                category, status = -1, ARTStatus.REJECTED
            for key, value in zip(out, (category, int(status), similarity, 1 - best), strict=True):
                out[key].append(value)
        return out

    def classify(self, rows):
        out = {"category": [], "status": [], "similarity": [], "novelty": []}
        for x in rows:
            winner, similarity, best = self.decide(self.prepare(x))
            full = len(self.prototypes) >= self.max_categories
            status = ARTStatus.RESONATED if winner is not None else ARTStatus.REJECTED if full else ARTStatus.NEW
            for key, value in zip(
                out, (-1 if winner is None else winner, int(status), similarity, 1 - best), strict=True
            ):
                out[key].append(value)
        return out


def assert_matches(output: ARTOutput, expected: dict, exact_scores=False):
    assert output.category.tolist() == expected["category"]
    assert output.status.tolist() == expected["status"]
    for key in ("similarity", "novelty"):
        got, want = getattr(output, key), torch.tensor(expected[key], dtype=torch.float64)
        if exact_scores:
            assert torch.equal(got.cpu(), want), key
        else:
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-12)


def assert_same_memory(memory: ARTMemory, reference: ReferenceART, atol=1e-10):
    assert memory.num_categories == len(reference.prototypes)
    assert memory.counts.tolist() == reference.counts
    if reference.prototypes:
        torch.testing.assert_close(
            memory.prototypes.double().cpu(), torch.stack(reference.prototypes), rtol=0, atol=atol
        )


def snapshot(memory: ARTMemory):
    state = {name: tensor.clone() for name, tensor in memory.state_dict().items()}
    return state, (memory.vigilance, memory.beta, memory.alpha, memory.rule, memory.dim, memory.max_categories)


def assert_unchanged(memory: ARTMemory, before):
    state, hyper = before
    after = memory.state_dict()
    assert state.keys() == after.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, after[name]), name
    assert hyper == (memory.vigilance, memory.beta, memory.alpha, memory.rule, memory.dim, memory.max_categories)


def clustered(seed, n, dim, clusters, noise, unit=False):
    """Rows around a few random centers: a mix of resonances and new categories."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g, dtype=torch.float64)
    rows = centers[torch.randint(0, clusters, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g)
    return torch.sigmoid(rows) if unit else rows


def random_splits(n, seed):
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, max(n, 2), (4,), generator=g).tolist()) - {0, n})
    return [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


def run_in_pieces(memory, rows, sizes):
    outputs = [memory.update(piece) for piece in rows.split(sizes)]
    return ARTOutput(*(torch.cat([getattr(o, name) for o in outputs]) for name in ARTOutput.__dataclass_fields__))


# ---------------------------------------------------------------------------------------------------------------------
# Exactness against the loop

CASES = [
    # rule, dim, clusters, noise, vigilance, beta, max_categories
    ("cosine", 2, 4, 0.3, 0.9, None, 1024),
    ("cosine", 3, 6, 0.4, 0.75, 0.3, 1024),
    ("cosine", 8, 5, 0.5, 0.5, 0.9, 1024),
    ("cosine", 16, 12, 0.25, 0.8, 0.5, 40),
    ("cosine", 32, 30, 0.3, 0.95, 0.1, 1024),
    ("cosine", 5, 3, 1.0, 0.0, 0.5, 1024),  # vigilance 0: everything resonates with something
    ("cosine", 4, 8, 0.6, 0.99, 1.0, 25),  # beta 1 and a small capacity
    ("cosine", 6, 8, 0.6, 0.9, 0.0, 1024),  # beta 0: prototypes never move
    ("fuzzy", 2, 4, 0.5, 0.8, None, 1024),
    ("fuzzy", 6, 5, 0.7, 0.7, 0.5, 1024),
    ("fuzzy", 12, 8, 0.5, 0.85, 0.2, 30),
    ("fuzzy", 4, 3, 1.0, 0.5, 0.0, 1024),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-d{c[1]}-v{c[4]}-b{c[5]}-cap{c[6]}" for c in CASES])
def test_update_matches_reference_for_any_batching(case, seed):
    rule, dim, clusters, noise, vigilance, beta, cap = case
    rows = clustered(seed, 160, dim, clusters, noise, unit=rule == "fuzzy")
    reference = ReferenceART(rule, vigilance, beta, max_categories=cap)
    expected = reference.update(rows)
    hyper = {"rule": rule, "vigilance": vigilance, "beta": beta, "max_categories": cap, "dtype": torch.float64}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the capacity warning
        for sizes in ([160], [1] * 160, [7] * 22 + [6], random_splits(160, seed)):
            memory = ARTMemory(dim, **hyper)
            assert_matches(run_in_pieces(memory, rows, sizes), expected)
            assert_same_memory(memory, reference)


@pytest.mark.parametrize("rule, vigilance", [("cosine", 0.97), ("fuzzy", 0.9)])
@pytest.mark.parametrize("knobs", [(1, 1, 1, 1), (2, 1, 4, 1), (4, 2, 16, 2), (128, 64, 512, 8)])
def test_block_engine_is_exact_whatever_its_sizes(monkeypatch, knobs, rule, vigilance):
    """Tiny blocks and a single round force partial blocks and the accept-the-agreeing-prefix path."""
    for name, value in zip(("block_size", "min_block_size", "max_block_size", "max_rounds"), knobs, strict=True):
        monkeypatch.setattr(ART_RULES[rule], name, value)
    # Many close clusters in 3-D: decisions inside a block depend on each other all the time.
    rows = clustered(7, 300, 3, 10, 0.35, unit=rule == "fuzzy")
    reference = ReferenceART(rule, vigilance, 0.4, max_categories=60)
    expected = reference.update(rows)
    memory = ARTMemory(3, rule=rule, vigilance=vigilance, beta=0.4, max_categories=60, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_matches(memory.update(rows), expected)
    assert_same_memory(memory, reference)


def test_update_matches_reference_at_gpt2_width_with_float32_buffers():
    rows = clustered(3, 300, 768, 60, 0.6)
    reference = ReferenceART("cosine", 0.8)
    expected = reference.update(rows)
    memory = ARTMemory(768, vigilance=0.8)  # float32 prototypes: rounded once per call
    output = run_in_pieces(memory, rows, [200, 100])
    assert output.category.tolist() == expected["category"] and output.status.tolist() == expected["status"]
    assert_same_memory(memory, reference, atol=1e-6)


def test_float32_matmul_precision_setting_does_not_change_decisions():
    """Below "highest" precision, float32 matmuls may take TF32/bf16 shortcuts: the engine then scores in float64."""
    rows = clustered(4, 200, 16, 10, 0.3)
    expected = ReferenceART("cosine", 0.9).update(rows)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert_matches(ARTMemory(16, vigilance=0.9, dtype=torch.float64).update(rows), expected)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_a_new_rule_is_a_small_addition(monkeypatch):
    """A rule written only as choice/match/learn runs on the generic engine: here cosine, against the fast engine."""

    class PlainCosine(ARTRule):
        name, default_beta = "plain-cosine", 0.5
        choice, match, learn = CosineRule.choice, CosineRule.match, CosineRule.learn

    monkeypatch.setitem(ART_RULES, PlainCosine.name, PlainCosine)
    rows = clustered(5, 250, 6, 8, 0.4)
    fast = ARTMemory(6, vigilance=0.9, max_categories=30, dtype=torch.float64)
    plain = ARTMemory(6, rule="plain-cosine", vigilance=0.9, max_categories=30, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = fast.update(rows), plain.update(rows)
    assert torch.equal(a.category, b.category) and torch.equal(a.status, b.status)
    torch.testing.assert_close(fast.weight, plain.weight, rtol=0, atol=1e-12)


# Exact arithmetic (small dyadic values, beta in {0, 1}, or 1/2 for short streams): every tie and every threshold is
# exact, so the memory must reproduce the loop bit for bit, whatever the batching.
VIGILANCES = [0.0, 0.25, 0.5, 0.6, 0.75, 0.8, 1.0]  # cos = 0.5, 0.6, 0.8 occur exactly with small integer vectors


@st.composite
def exact_streams(draw):
    rule = draw(st.sampled_from(["cosine", "fuzzy"]))
    dim = draw(st.integers(1, 4))
    beta = draw(st.sampled_from([0.0, 1.0, 0.5]))
    n = draw(st.integers(1, 12 if beta == 0.5 else 30))
    values = st.integers(-4, 4).map(lambda v: v / 4) if rule == "cosine" else st.integers(0, 8).map(lambda v: v / 8)
    rows = torch.tensor(draw(st.lists(st.lists(values, min_size=dim, max_size=dim), min_size=n, max_size=n)))
    sizes = draw(st.lists(st.integers(1, n), min_size=1, max_size=4))
    return rule, rows.double(), draw(st.sampled_from(VIGILANCES)), beta, draw(st.integers(1, 6)), sizes


@settings(max_examples=120, deadline=None)
@given(exact_streams())
def test_property_exact_data_matches_reference_bit_for_bit(stream):
    rule, rows, vigilance, beta, cap, sizes = stream
    reference = ReferenceART(rule, vigilance, beta, max_categories=cap)
    expected = reference.update(rows)
    sizes = [s for s in sizes if s] + [rows.shape[0]]
    cut, pieces = 0, []
    for size in sizes:  # a random split of the stream into calls
        pieces.append(min(size, rows.shape[0] - cut))
        cut += pieces[-1]
    memory = ARTMemory(
        rows.shape[1], rule=rule, vigilance=vigilance, beta=beta, max_categories=cap, dtype=torch.float64
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output = run_in_pieces(memory, rows, [p for p in pieces if p])
    assert_matches(output, expected, exact_scores=True)
    assert_same_memory(memory, reference, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    dim=st.integers(1, 24),
    n=st.integers(1, 120),
    vigilance=st.floats(0, 1),
    beta=st.floats(0, 1),
    rule=st.sampled_from(["cosine", "fuzzy"]),
)
def test_property_random_data_matches_reference(seed, dim, n, vigilance, beta, rule):
    rows = clustered(seed, n, dim, 5, 0.5, unit=rule == "fuzzy")
    reference = ReferenceART(rule, vigilance, beta, max_categories=20)
    expected = reference.update(rows)
    memory = ARTMemory(dim, rule=rule, vigilance=vigilance, beta=beta, max_categories=20, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_matches(run_in_pieces(memory, rows, random_splits(n, seed)), expected)
    assert_same_memory(memory, reference)


# ---------------------------------------------------------------------------------------------------------------------
# Near ties and thresholds


@pytest.mark.parametrize("rule, dim", [("cosine", 300), ("fuzzy", 64)])
def test_duplicated_inputs_resonate_at_vigilance_one(rule, dim):
    """x equal to a prototype scores exactly 1.0, even for arbitrary floats and wide inputs."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(20, dim, generator=g, dtype=torch.float64)
    rows = base[torch.randint(0, 20, (120,), generator=g)]
    memory = ARTMemory(dim, rule=rule, vigilance=1.0, beta=0.5 if rule == "cosine" else 1.0, dtype=torch.float64)
    output = memory.update(rows)
    expected = ReferenceART(rule, 1.0, memory.beta).update(rows)
    assert_matches(output, expected)
    assert memory.num_categories == len(set(map(tuple, rows.tolist())))
    assert (output.similarity[output.status == ARTStatus.RESONATED] == 1.0).all()
    # And classify agrees: every stored input resonates with itself.
    assert (memory.classify(rows).status == ARTStatus.RESONATED).all()


def test_equal_similarity_to_two_prototypes_goes_to_the_lower_index():
    memory = ARTMemory(2, vigilance=0.7, beta=0.5, dtype=torch.float64)
    memory.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    output = memory.update(torch.tensor([[1.0, 1.0]]))  # cos = 1/sqrt(2) to both
    assert output.category.tolist() == [0] and output.status_names() == ["resonated"]
    torch.testing.assert_close(memory.prototypes[0], torch.tensor([1.0, 0.5], dtype=torch.float64))
    # Fuzzy: equal choice values, lowest index first.
    fuzzy = ARTMemory(2, rule="fuzzy", vigilance=0.5, dtype=torch.float64)
    fuzzy.update(torch.tensor([[0.25, 0.5], [0.5, 0.25]]))
    assert fuzzy.update(torch.tensor([[0.375, 0.375]])).category.tolist() == [0]


def test_scores_exactly_at_the_vigilance_resonate():
    # cos((3, 4), (5, 0)) = 15 / 25 = 0.6 exactly.
    for vigilance, status in ((0.6, "resonated"), (math.nextafter(0.6, 1.0), "new")):
        memory = ARTMemory(2, vigilance=vigilance, dtype=torch.float64)
        memory.update(torch.tensor([[5.0, 0.0]]))
        output = memory.update(torch.tensor([[3.0, 4.0]]))
        assert output.status_names() == [status]
        assert output.similarity.item() == 0.6


def test_rivals_closer_than_float32_resolution_are_decided_exactly():
    """Two prototypes whose cosines with x differ by ~1e-9: float32 scores cannot order them, the exact re-check must.
    Checked against the float64 loop, with the prototypes in both orders."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, generator=g, dtype=torch.float64)
    d = torch.randn(64, generator=g, dtype=torch.float64)
    d -= (d @ x) / (x @ x) * x  # orthogonal to x
    near, nearer = x + 1e-3 * d, x + (1e-3 - 1e-6) * d
    for protos in ((near, nearer), (nearer, near)):
        memory = ARTMemory(64, dtype=torch.float64)
        reference = ReferenceART("cosine")
        for rows, vigilance in ((torch.stack(protos), 1.0), (torch.stack([x, x]), 0.99)):
            memory.vigilance = reference.vigilance = vigilance
            expected = reference.update(rows)
            assert_matches(memory.update(rows), expected)
        assert expected["category"] == [int(protos[1] is nearer)] * 2
        assert_same_memory(memory, reference)


def test_zero_vectors_score_zero():
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    for vigilance in (0.0, 0.5):
        expected = ReferenceART("cosine", vigilance).update(rows)
        assert_matches(ARTMemory(2, vigilance=vigilance, dtype=torch.float64).update(rows), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Capacity, reads, dtypes


def test_full_memory_rejects_warns_once_and_overwrites_nothing():
    memory = ARTMemory(4, vigilance=0.99, max_categories=3, dtype=torch.float64)
    rows = torch.eye(4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="full") as caught:
        output = memory.update(rows)
    assert output.status_names() == ["new", "new", "new", "rejected"]
    assert output.category.tolist() == [0, 1, 2, -1]
    kept = memory.prototypes.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        again = memory.update(torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    assert again.status_names() == ["rejected", "resonated"]
    assert len([w for w in caught if "full" in str(w.message)]) == 1
    assert torch.equal(memory.prototypes[1:], kept[1:]) and memory.counts.tolist() == [2, 1, 1]
    assert memory.classify(torch.tensor([[0.0, 0.0, 0.0, 1.0]])).status_names() == ["rejected"]


@pytest.mark.parametrize("rule", ["cosine", "fuzzy"])
def test_classify_and_novelty_never_learn(rule):
    rows = clustered(2, 120, 5, 6, 0.4, unit=rule == "fuzzy")
    memory = ARTMemory(5, rule=rule, vigilance=0.8, max_categories=12, dtype=torch.float64)
    reference = ReferenceART(rule, 0.8, max_categories=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory.update(rows[:80])
    reference.update(rows[:80])
    before = snapshot(memory)
    output = memory.classify(rows[80:])
    novelty = memory.novelty(rows[80:])
    assert_unchanged(memory, before)
    assert_matches(output, reference.classify(rows[80:]))
    assert torch.equal(novelty, output.novelty)


def test_empty_memory_reads():
    memory = ARTMemory(3)
    output = memory.classify(torch.randn(4, 3))
    assert output.category.tolist() == [-1] * 4 and output.status_names() == ["new"] * 4
    assert memory.novelty(torch.randn(2, 3)).tolist() == [1.0, 1.0]
    first = memory.update(torch.randn(1, 3))
    assert first.novelty.tolist() == [1.0] and first.similarity.tolist() == [0.0]


def test_bfloat16_memory_keeps_the_decisions_and_scores_in_float64():
    rows = clustered(6, 200, 32, 8, 0.1)
    reference = ReferenceART("cosine", 0.9)
    expected = reference.update(rows)
    memory = ARTMemory(32, vigilance=0.9, dtype=torch.bfloat16)
    assert memory.weight.dtype == torch.bfloat16 and memory.category_counts.dtype == torch.long
    output = memory.update(rows.to(torch.bfloat16))
    assert output.category.tolist() == expected["category"] and output.status.tolist() == expected["status"]
    assert output.similarity.dtype == torch.float64
    torch.testing.assert_close(memory.prototypes.double(), torch.stack(reference.prototypes), rtol=2e-2, atol=2e-2)


def test_state_dict_round_trip_in_a_parent_model():
    parent = nn.ModuleDict({"head": nn.Linear(4, 4), "art": ARTMemory(4, max_categories=8)})
    parent["art"].update(clustered(0, 30, 4, 3, 0.2).float())
    state = parent.state_dict()
    assert {"art.weight", "art.category_counts", "art.num_committed"} <= state.keys()
    fresh = nn.ModuleDict({"head": nn.Linear(4, 4), "art": ARTMemory(4, max_categories=8)})
    fresh.load_state_dict(state)  # how Trainer resumes
    for name in ("weight", "category_counts", "num_committed"):
        assert torch.equal(getattr(fresh["art"], name), getattr(parent["art"], name))
    more = clustered(1, 20, 4, 3, 0.2).float()
    a, b = parent["art"].update(more), fresh["art"].update(more)
    assert torch.equal(a.category, b.category) and torch.equal(parent["art"].weight, fresh["art"].weight)


def test_api_surface():
    import modeling_gptb

    assert modeling_gptb.ARTMemory is ARTMemory and "ARTMemory" in modeling_gptb.__all__
    memory = ARTMemory(3, rule="fuzzy", vigilance=0.5, max_categories=4)
    assert memory.beta == 1.0 and ARTMemory(3).beta == 0.5
    assert "rule='fuzzy'" in repr(memory) and "max_categories=4" in repr(memory)
    assert memory.weight.shape == (4, 6)  # complement coded
    single = memory.update(torch.tensor([0.1, 0.2, 0.3]))  # a 1-D input is one row
    assert len(single) == 1 and single.status_names() == ["new"]
    assert memory.prototypes.shape == (1, 6) and memory.counts.tolist() == [1]
    empty = memory.update(torch.zeros(0, 3))
    assert len(empty) == 0 and memory.num_categories == 1
    assert [s.name.lower() for s in ARTStatus] == ["resonated", "new", "rejected"]
    assert single[0].status_names() == ["new"] and len(single[torch.tensor([True])]) == 1
    memory.reset()
    assert memory.num_categories == 0 and not memory.weight.any() and not memory.category_counts.any()
    # Inputs that carry gradients (pooled hidden states) are learned from without building a graph.
    x = torch.rand(4, 3, requires_grad=True)
    output = memory.update(x)
    assert output.similarity.grad_fn is None and not memory.weight.requires_grad


def test_to_unit_interval():
    x = torch.tensor([-1000.0, -1.0, 0.0, 2.0, 1000.0])
    squashed = to_unit_interval(x)
    assert squashed.min() >= 0 and squashed.max() <= 1 and squashed[2] == 0.5
    assert to_unit_interval(x, -1.0, 3.0).tolist() == [0.0, 0.0, 0.25, 0.75, 1.0]
    with pytest.raises(ValueError, match="high > low"):
        to_unit_interval(x, 1.0, 1.0)
    ARTMemory(5, rule="fuzzy").update(to_unit_interval(torch.randn(3, 5) * 10))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the problem, before anything changes


@pytest.fixture
def trained():
    memory = ARTMemory(4, vigilance=0.8, max_categories=6, dtype=torch.float64)
    memory.update(clustered(0, 20, 4, 3, 0.3))
    fuzzy = ARTMemory(4, rule="fuzzy", vigilance=0.8, max_categories=6)
    fuzzy.update(clustered(0, 20, 4, 3, 0.3, unit=True))
    return memory, fuzzy


BAD_INPUTS = {
    "nan": (torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, float("nan"), 0.1, 0.2]]), "row 1 holds NaN or Inf"),
    "inf": (torch.tensor([[float("inf"), 0.2, 0.3, 0.4]]), "row 0 holds NaN or Inf"),
    "-inf": (torch.tensor([[0.5, 0.2, 0.3, -float("inf")]]), "finite"),
    "wrong dim": (torch.rand(3, 5), "dim=4 features per row, got 5"),
    "3-D": (torch.rand(2, 3, 4), r"shape \(N, 4\).*got shape \(2, 3, 4\)"),
    "0-D": (torch.tensor(0.5), r"shape \(N, 4\)"),
    "bool": (torch.ones(2, 4, dtype=torch.bool), "real numbers"),
    "complex": (torch.ones(2, 4, dtype=torch.complex64), "real numbers"),
}


@pytest.mark.parametrize("method", ["update", "classify", "novelty"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_and_change_nothing(trained, name, method):
    x, message = BAD_INPUTS[name]
    for memory in trained:
        before = snapshot(memory)
        with pytest.raises(ValueError, match=message):
            getattr(memory, method)(x)
        assert_unchanged(memory, before)


@pytest.mark.parametrize("value", [-0.1, 1.1])
def test_fuzzy_inputs_outside_the_unit_interval(trained, value):
    _, fuzzy = trained
    before = snapshot(fuzzy)
    x = torch.full((2, 4), 0.5)
    x[1, 2] = value
    with pytest.raises(ValueError, match=r"inputs in \[0, 1\].*to_unit_interval"):
        fuzzy.update(x)
    assert_unchanged(fuzzy, before)


BAD_HYPERPARAMETERS = [
    ({"vigilance": -0.1}, r"vigilance must be a number in \[0, 1\], got -0.1"),
    ({"vigilance": 1.5}, r"vigilance must be a number in \[0, 1\]"),
    ({"vigilance": float("nan")}, "vigilance"),
    ({"beta": -0.5}, r"beta must be a number in \[0, 1\]"),
    ({"beta": 2}, r"beta must be a number in \[0, 1\]"),
    ({"alpha": 0.0}, "alpha must be a finite number > 0"),
    ({"alpha": -1.0}, "alpha must be a finite number > 0"),
    ({"alpha": float("inf")}, "alpha must be a finite number > 0"),
    ({"max_categories": 0}, "max_categories must be an integer >= 1, got 0"),
    ({"max_categories": 2.5}, "max_categories must be an integer"),
    ({"max_categories": True}, "max_categories must be an integer"),
    ({"rule": "nope"}, r"unknown ART rule 'nope'; expected one of \['cosine', 'fuzzy'\]"),
    ({"dim": 0}, "dim must be an integer >= 1"),
    ({"dtype": torch.long}, "floating point dtype"),
]


@pytest.mark.parametrize("kwargs, message", BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_are_refused(kwargs, message):
    kwargs = {"dim": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        ARTMemory(**kwargs)


def test_bad_hyperparameter_assignment_changes_nothing(trained):
    memory, _ = trained
    before = snapshot(memory)
    for name, value in (("vigilance", 2.0), ("beta", -1), ("alpha", 0)):
        with pytest.raises(ValueError, match=name):
            setattr(memory, name, value)
    assert_unchanged(memory, before)


# ---------------------------------------------------------------------------------------------------------------------
# Persistence


def trained_memory(rule="cosine", dtype=torch.float32):
    memory = ARTMemory(5, rule=rule, vigilance=0.7, beta=0.25, alpha=0.01, max_categories=16, dtype=dtype)
    memory.update(clustered(3, 60, 5, 6, 0.4, unit=rule == "fuzzy"))
    return memory


def assert_identical(a: ARTMemory, b: ARTMemory):
    for name in ("weight", "category_counts", "num_committed"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.rule, a.dim, a.vigilance, a.beta, a.alpha, a.max_categories) == (
        b.rule,
        b.dim,
        b.vigilance,
        b.beta,
        b.alpha,
        b.max_categories,
    )


@pytest.mark.parametrize(
    "rule, dtype", [("cosine", torch.float32), ("fuzzy", torch.float64), ("cosine", torch.bfloat16)]
)
def test_save_and_load_round_trip_bit_exactly(tmp_path, rule, dtype):
    memory = trained_memory(rule, dtype)
    path = memory.save_pretrained(tmp_path)
    assert path == os.path.join(tmp_path, ART_MEMORY_FILE) and sorted(os.listdir(tmp_path)) == [ART_MEMORY_FILE]
    for source in (tmp_path, path):
        loaded = ARTMemory.from_pretrained(source)
        assert_identical(memory, loaded)
    other = ARTMemory(5, rule=rule, vigilance=0.7, beta=0.25, alpha=0.01, max_categories=16, dtype=dtype)
    assert_identical(memory, other.load_file(path))
    more = clustered(9, 30, 5, 6, 0.4, unit=rule == "fuzzy")
    assert torch.equal(memory.update(more).category, loaded.update(more).category)
    assert torch.equal(memory.weight, loaded.weight)


def test_empty_memory_round_trip(tmp_path):
    memory = ARTMemory(3, max_categories=2)
    memory.save_pretrained(tmp_path / "sub")
    assert_identical(memory, ARTMemory.from_pretrained(tmp_path, subfolder="sub"))


def test_load_from_a_hub_repo_id_through_the_cache(tmp_path, monkeypatch):
    memory = trained_memory()
    snapshot_dir = tmp_path / "models--org--art" / "snapshots" / ("a" * 40)
    memory.save_pretrained(snapshot_dir)
    (tmp_path / "models--org--art" / "refs").mkdir()
    (tmp_path / "models--org--art" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_identical(memory, ARTMemory.from_pretrained("org/art", cache_dir=tmp_path, local_files_only=True))
    with pytest.raises(OSError):
        ARTMemory.from_pretrained("org/missing", cache_dir=tmp_path, local_files_only=True)


def test_load_file_refuses_a_memory_that_does_not_fit(tmp_path):
    path = trained_memory().save_pretrained(tmp_path)
    for kwargs, message in (
        ({"dim": 6}, "dim is 5 in the file but 6 here"),
        ({"rule": "fuzzy"}, "rule is 'cosine' in the file but 'fuzzy' here"),
        ({"vigilance": 0.5}, "vigilance is 0.7 in the file but 0.5 here"),
        ({"max_categories": 2}, "do not fit in max_categories=2"),
    ):
        memory = ARTMemory(**{"dim": 5, "vigilance": 0.7, "beta": 0.25, "alpha": 0.01, **kwargs})
        memory.update(torch.rand(2, memory.dim))
        before = snapshot(memory)
        with pytest.raises(ValueError, match=message):
            memory.load_file(path)
        assert_unchanged(memory, before)


def rewrite(path, tensors=None, **metadata_changes):
    """Rewrite an ART file with other tensors or metadata (None removes a key), with a checksum that matches."""
    _, original = load_art_file(path)
    tensors = original if tensors is None else tensors
    with open(path, "rb") as f:
        data = f.read()
    metadata = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
    for key, value in metadata_changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    metadata["sha256"] = checksum(metadata, tensors)
    with open(path, "wb") as f:
        f.write(safetensors_save(tensors, metadata))


def older_tensors(tensors: dict, version: str) -> dict:
    """A current file's tensors as a file of format `version` (3 or 4) held them: no outlier probe, nine calibration
    fields, and before 4 no per-dimension scale."""
    older = {name: t for name, t in tensors.items() if name not in ("outlier_probe", "outlier_bias")}
    older["calibration"] = tensors["calibration"][:9].clone()
    if version == "3":
        del older["input_dim_scale"]
    return older


def damage_cases():
    def truncate(path):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) - 7])

    def cut_header(path):
        data = open(path, "rb").read()
        open(path, "wb").write(data[:20])

    def flip_a_bit(path):
        data = bytearray(open(path, "rb").read())
        data[-3] ^= 0x10
        open(path, "wb").write(bytes(data))

    def not_safetensors(path):
        open(path, "wb").write(b"PK\x03\x04 this is a zip, or a pickle, or anything else" * 3)

    def tiny(path):
        open(path, "wb").write(b"abc")

    def shapes(path):
        _, tensors = load_art_file(path)
        rewrite(path, {**tensors, "counts": tensors["counts"][:-1].clone()})

    def widths(path):
        _, tensors = load_art_file(path)
        rewrite(path, {**tensors, "prototypes": tensors["prototypes"][:, :-1].clone()})

    def counts_dtype(path):
        _, tensors = load_art_file(path)
        rewrite(path, {**tensors, "counts": tensors["counts"].float()})

    return {
        "truncated": (truncate, "damaged or truncated"),
        "header cut": (cut_header, "truncated, or not a safetensors file"),
        "bit flip": (flip_a_bit, "checksum mismatch"),
        "not safetensors": (not_safetensors, "not a safetensors file"),
        "too short": (tiny, r"not a safetensors file \(only 3 bytes\)"),
        "version": (lambda p: rewrite(p, format_version="6"), "unsupported format version '6'"),
        "format": (lambda p: rewrite(p, format="something-else"), "not an ARTMemory file"),
        "missing key": (lambda p: rewrite(p, vigilance=None), r"metadata lacks \['vigilance'\]"),
        "bad value": (lambda p: rewrite(p, beta="1.5"), r"bad metadata beta='1.5'"),
        "bad dim": (lambda p: rewrite(p, dim="five"), "bad metadata dim='five'"),
        "bad rule": (lambda p: rewrite(p, rule="hebbian"), "unknown ART rule 'hebbian'"),
        "count mismatch": (lambda p: rewrite(p, num_categories="3"), r"expected floats of shape \(3, 5\)"),
        "counts vs prototypes": (shapes, r"counts are .* expected int64 of shape"),
        "prototype width": (widths, r"prototypes are .* shape \(\d+, 4\)"),
        "counts dtype": (counts_dtype, "counts are torch.float32"),
    }


@pytest.mark.parametrize("name", list(damage_cases()))
def test_damaged_or_mismatched_files_are_refused_clearly(tmp_path, name):
    damage, message = damage_cases()[name]
    path = trained_memory().save_pretrained(tmp_path)
    damage(path)
    for load in (ARTMemory.from_pretrained, load_art_file):
        with pytest.raises(ValueError, match=message) as error:
            load(path)
        assert str(path) in str(error.value)
    memory = trained_memory()
    before = snapshot(memory)
    with pytest.raises(ValueError, match=message):
        memory.load_file(path)
    assert_unchanged(memory, before)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch, failing):
    old = trained_memory()
    path = old.save_pretrained(tmp_path)
    good = open(path, "rb").read()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(art_memory.os, failing, boom)
    new = trained_memory()
    new.update(torch.rand(5, 5))
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path) == [ART_MEMORY_FILE]  # no temporary file left behind
    assert_identical(old, ARTMemory.from_pretrained(tmp_path))


def test_only_the_main_process_writes(tmp_path):
    assert trained_memory().save_pretrained(tmp_path, is_main_process=False) is None
    assert not os.path.exists(tmp_path / ART_MEMORY_FILE)


def test_decisions_are_unchanged_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    plain = ARTMemory(32, vigilance=0.3)
    expected = plain.update(x)
    mixed = ARTMemory(32, vigilance=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mixed.update(x)
        read = mixed.classify(x)
    assert torch.equal(got.category, expected.category) and torch.equal(got.status, expected.status)
    assert torch.equal(mixed.prototypes, plain.prototypes)
    assert read.similarity.dtype == torch.float64
