"""ARTMemory: the batched exact update against the one-at-a-time loop over a Python list of prototypes.

The reference memories below are docs/design.md#artmemory written plainly, row by row (they do not import our module):
the cosine rule as the project's original memory, a Python list of prototypes scanned for every input; the fuzzy rule
as a straightforward per-sample Fuzzy ART (choice values per category, candidates tried in order). Both run in
float64, the dtype ARTMemory scores in, and the memory under test keeps float64 prototypes, so the decisions must be
identical and the prototypes equal up to summation order. Both start from the same pre-filled memory of about a
thousand categories and learn the same stream: inputs near known categories, and some new ones.
"""

import statistics
import time

import torch

from modeling_gptb.art_memory import ARTMemory, CosineRule

from .common import Context, row, time_once

RESONATED, NEW, REJECTED = 0, 1, 2


class ListCosineART:
    """The original memory: a list of prototypes, each input compared with every prototype in turn."""

    def __init__(self, vigilance=0.75, beta=0.5, max_categories=1024):
        self.vigilance, self.beta, self.max_categories = vigilance, beta, max_categories
        self.prototypes, self.counts = [], []

    @staticmethod
    def cosine(x, w):
        return float(torch.dot(x, w) / torch.sqrt(torch.dot(x, x) * torch.dot(w, w)))

    def update(self, x):
        if self.prototypes:
            similarities = [self.cosine(x, w) for w in self.prototypes]
            best = max(range(len(similarities)), key=similarities.__getitem__)  # ties: the lowest index
            if similarities[best] >= self.vigilance:
                self.prototypes[best] = (1 - self.beta) * self.prototypes[best] + self.beta * x
                self.counts[best] += 1
                return best, RESONATED
        if len(self.prototypes) >= self.max_categories:
            return -1, REJECTED
        self.prototypes.append(x.clone())
        self.counts.append(1)
        return len(self.prototypes) - 1, NEW


class SampleFuzzyART:
    """Fuzzy ART one sample at a time: complement coding, choice per category, search in order of choice."""

    def __init__(self, vigilance=0.9, beta=1.0, alpha=1e-3, max_categories=1024):
        self.vigilance, self.beta, self.alpha, self.max_categories = vigilance, beta, alpha, max_categories
        self.prototypes, self.counts = [], []

    def update(self, a):
        i = torch.cat([a, 1 - a])
        size = i.sum()
        overlaps = [torch.minimum(i, w).sum() for w in self.prototypes]
        choices = [float(o / (self.alpha + w.sum())) for o, w in zip(overlaps, self.prototypes, strict=True)]
        for j in sorted(range(len(choices)), key=lambda j: (-choices[j], j)):
            if float(overlaps[j] / size) >= self.vigilance:
                w = self.prototypes[j]
                self.prototypes[j] = self.beta * torch.minimum(i, w) + (1 - self.beta) * w
                self.counts[j] += 1
                return j, RESONATED
        if len(self.prototypes) >= self.max_categories:
            return -1, REJECTED
        self.prototypes.append(i)
        self.counts.append(1)
        return len(self.prototypes) - 1, NEW


def cosine_stream(categories: int, updates: int, dim: int, seed: int = 0):
    """Category centres, and a stream of inputs: 90% near a centre (cosine ~0.9), 10% new directions."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(categories, dim, generator=generator)
    pick = torch.randint(0, categories, (updates,), generator=generator)
    near = centres[pick] / centres[pick].norm(dim=1, keepdim=True)
    near = near + 0.6 / dim**0.5 * torch.randn(updates, dim, generator=generator)
    fresh = torch.randn(updates, dim, generator=generator)
    return centres, torch.where(torch.rand(updates, 1, generator=generator) < 0.9, near, fresh)


def fuzzy_stream(categories: int, updates: int, dim: int, seed: int = 0):
    """Centres in [0.1, 0.9]^dim and inputs within 0.02 of one per feature (90%) or anywhere in [0, 1] (10%)."""
    generator = torch.Generator().manual_seed(seed)
    centres = 0.1 + 0.8 * torch.rand(categories, dim, generator=generator)
    pick = torch.randint(0, categories, (updates,), generator=generator)
    near = (centres[pick] + 0.04 * (torch.rand(updates, dim, generator=generator) - 0.5)).clamp(0, 1)
    fresh = torch.rand(updates, dim, generator=generator)
    return centres, torch.where(torch.rand(updates, 1, generator=generator) < 0.9, near, fresh)


def build(ctx: Context, rule: str, categories: int, updates: int, device: torch.device):
    """The stream, a pre-filled ARTMemory on `device` and the reference holding the same categories."""
    dim, capacity = ctx.sizes.art_dim, categories + updates
    if rule == "cosine":
        centres, stream = cosine_stream(categories, updates, dim)
        reference = ListCosineART(max_categories=capacity)
        reference.prototypes = [c.double() for c in centres]
        memory = ARTMemory(dim, "cosine", vigilance=0.75, beta=0.5, max_categories=capacity, dtype=torch.float64)
    else:
        centres, stream = fuzzy_stream(categories, updates, dim)
        reference = SampleFuzzyART(max_categories=capacity)
        reference.prototypes = [torch.cat([c, 1 - c]) for c in centres.double()]
        memory = ARTMemory(dim, "fuzzy", vigilance=0.9, beta=1.0, max_categories=capacity, dtype=torch.float64)
    reference.counts = [1] * categories
    memory = memory.to(device)
    prefill = memory.update(centres.to(device))
    if prefill.category.tolist() != list(range(categories)):
        raise RuntimeError("ART benchmark: every pre-fill centre should make a new category")
    return stream, memory, reference


def compare_rule(ctx: Context, rule: str, categories: int, updates: int, reference_updates: int) -> dict:
    stream, memory, reference = build(ctx, rule, categories, updates, ctx.device)
    start = {name: tensor.clone() for name, tensor in memory.state_dict().items()}
    rows = stream.to(ctx.device)

    def ours(count=updates):
        memory.load_state_dict(start)
        return memory.update(rows[:count])

    def timed_ours():  # the update alone, from the same starting memory each time
        memory.load_state_dict(start)
        return time_once(lambda: memory.update(rows), ctx.device)

    # ours, the reference once, ours again: the reference is slow, so it runs once between our repetitions
    ours()
    times = [timed_ours()]
    begin = time.perf_counter()
    expected = [reference.update(x) for x in stream[:reference_updates].double()]
    reference_seconds = time.perf_counter() - begin
    times += [timed_ours() for _ in range(2)]
    seconds = statistics.median(times)

    decided = ours()
    resonated = int((decided.status == RESONATED).sum())
    categories_after = int(memory.num_committed)
    same_categories = decided.category[:reference_updates].tolist() == [c for c, _ in expected]
    same_statuses = decided.status[:reference_updates].tolist() == [s for _, s in expected]
    identical = same_categories and same_statuses
    ours(reference_updates)  # the prototypes after the reference's prefix of the stream
    weight = memory.weight[: len(reference.prototypes)].cpu()
    max_difference = float((weight - torch.stack(reference.prototypes)).abs().max())
    result = {
        "identical_decisions": identical,
        "max_prototype_difference": max_difference,
        "updates_per_s": updates / seconds,
        "reference_updates_per_s": reference_updates / reference_seconds,
        "categories_before": categories,
        "categories_after": categories_after,
        "resonated": resonated,
        "updates": updates,
        "reference_updates": reference_updates,
    }
    result["ratio"] = result["updates_per_s"] / result["reference_updates_per_s"]
    result.update(compare_engines(memory, start, rows, ctx.device))
    # The rule's unavoidable work alone: scoring every input against every category
    result["floor_s"] = FLOORS[rule](ctx, updates, (categories + categories_after) // 2)
    result["floor_fraction"] = result["floor_s"] / seconds
    if ctx.cuda:  # GPU goal: 10x our own exact update on the CPU
        _, cpu_memory, _ = build(ctx, rule, categories, updates, torch.device("cpu"))
        cpu_seconds = time_once(lambda: cpu_memory.update(stream), torch.device("cpu"))
        result["cpu_updates_per_s"] = updates / cpu_seconds
    return result


def compare_engines(memory: ARTMemory, start: dict, rows: torch.Tensor, device: torch.device) -> dict:
    """The device engine (no host syncs) against the block engine on the same device: updates/s, interleaved, and
    whether they decide alike (categories and statuses equal; scores and prototypes within 1e-12: the engines compute
    a chain of updates within a block differently, docs/design.md#the-device-engine)."""
    default, outputs, times, prototypes = memory.engine, {}, {"block": [], "device": []}, {}
    try:
        for repeat in range(3):
            for engine in times:
                memory.engine = engine
                memory.load_state_dict(start)
                if repeat == 0:  # warm-up, and the decisions to compare
                    outputs[engine] = memory.update(rows)
                    prototypes[engine] = memory.weight.double()
                else:
                    times[engine].append(time_once(lambda: memory.update(rows), device))
    finally:
        memory.engine = default
        memory.load_state_dict(start)
    block, device_out = outputs["block"], outputs["device"]
    same = torch.equal(block.category, device_out.category) and torch.equal(block.status, device_out.status)
    gap = max(
        float((getattr(block, field) - getattr(device_out, field)).abs().max()) for field in ("similarity", "novelty")
    )
    gap = max(gap, float((prototypes["block"] - prototypes["device"]).abs().max()))
    speed = {engine: rows.shape[0] / statistics.median(seconds) for engine, seconds in times.items()}
    return {
        "engines_updates_per_s": speed,
        "device_over_block": speed["device"] / speed["block"],
        "engines_same_decisions": same and gap <= 1e-12,
        "engines_max_prototype_difference": gap,
    }


def cosine_floor(ctx: Context, updates: int, categories: int) -> float:
    """Seconds of the cosine scores alone: float32 matmuls of blocks of inputs (the engine's largest) by the
    prototypes."""
    inputs, prototypes = _random(ctx, updates, categories, torch.float32)
    block = CosineRule.max_block_size
    return _median_time(ctx, lambda: [rows @ prototypes.T for rows in inputs.split(block)])


def fuzzy_floor(ctx: Context, updates: int, categories: int) -> float:
    """Seconds of the fuzzy overlaps alone: for each input, the float64 sum of element-wise minima with every
    complement-coded prototype (the rule's arithmetic, one read of the prototypes per input), the minima written
    into one reused buffer (a fresh one per input costs more in page faults than the arithmetic)."""
    inputs, prototypes = _random(ctx, updates, categories, torch.float64, coded=True)
    minima = torch.empty_like(prototypes)
    return _median_time(ctx, lambda: [torch.minimum(i, prototypes, out=minima).sum(-1) for i in inputs])


FLOORS = {"cosine": cosine_floor, "fuzzy": fuzzy_floor}


def _random(ctx: Context, updates: int, categories: int, dtype: torch.dtype, coded: bool = False):
    generator = torch.Generator().manual_seed(0)
    width = ctx.sizes.art_dim * (2 if coded else 1)
    inputs = torch.rand(updates, width, generator=generator, dtype=dtype).to(ctx.device)
    return inputs, torch.rand(categories, width, generator=generator, dtype=dtype).to(ctx.device)


def _median_time(ctx: Context, fn) -> float:
    fn()
    return statistics.median(time_once(fn, ctx.device) for _ in range(3))


def run(ctx: Context) -> dict:
    sizes = ctx.sizes
    rows, data = [], {}
    for rule, categories, updates, reference_updates, reference_name in (
        ("cosine", sizes.art_categories, sizes.art_updates, sizes.art_reference_updates, "Python-list loop"),
        ("fuzzy", sizes.fuzzy_categories, sizes.fuzzy_updates, sizes.fuzzy_reference_updates, "per-sample loop"),
    ):
        result = compare_rule(ctx, rule, categories, updates, reference_updates)
        data[rule] = result
        goal = 200 if (rule == "cosine" and not ctx.cuda) else None
        rows.append(
            row(
                f"{rule}: updates/s, dim {sizes.art_dim}, {categories:,} categories ({updates:,} updates; "
                f"reference: {reference_name}, {reference_updates:,})",
                f"{result['updates_per_s']:,.0f}",
                f"{result['reference_updates_per_s']:,.0f}",
                f"{result['ratio']:,.0f}x",
                goal=f">= {goal}x" if goal else "",
                met=(result["ratio"] >= goal) if goal else None,
            )
        )
        scoring = {"cosine": "float32 score matmuls", "fuzzy": "float64 min-sum overlaps"}[rule]
        rows.append(
            row(
                f"{rule}: share of the update's time that its {scoring} of inputs by categories take alone",
                f"{result['floor_fraction']:.0%}",
                f"{result['floor_s'] * 1e3:.1f} ms of {result['updates'] / result['updates_per_s'] * 1e3:.1f} ms",
            )
        )
        rows.append(
            row(
                f"{rule}: same categories and statuses as the reference; max prototype difference",
                "identical" if result["identical_decisions"] else "DIFFERENT",
                f"{result['max_prototype_difference']:.1e}",
                goal="identical",
                met=result["identical_decisions"],
            )
        )
        speed = result["engines_updates_per_s"]
        rows.append(
            row(
                f"{rule}: device engine (no host syncs) vs block engine on this device, updates/s; same outputs",
                f"{speed['device']:,.0f}",
                f"{speed['block']:,.0f}",
                f"{result['device_over_block']:.2f}x; "
                + ("same" if result["engines_same_decisions"] else "DIFFERENT"),
                goal="same",
                met=result["engines_same_decisions"],
            )
        )
        if ctx.cuda:  # the default ("auto") engine on the GPU against ours on the CPU
            ratio = result["updates_per_s"] / result["cpu_updates_per_s"]
            rows.append(
                row(
                    f"{rule}: GPU updates/s vs our CPU update",
                    f"{result['updates_per_s']:,.0f}",
                    f"{result['cpu_updates_per_s']:,.0f}",
                    f"{ratio:.1f}x",
                    goal=">= 10x",
                    met=ratio >= 10,
                )
            )
    return {"rows": rows, "data": data}
