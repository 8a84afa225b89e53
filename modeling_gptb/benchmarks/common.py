"""What every benchmark section shares: sizes, the device, timing, model builders and the FLOP count.

Timing (docs/design.md#how-speed-is-measured): on shared, noisy machines the things compared run interleaved
(A, B, A, B, ...) and each gets the median of its repetitions; sections report ratios. On CUDA every timed call is
bracketed by `torch.cuda.synchronize()` and timed with CUDA events.
"""

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Sizes:
    """Every size a run uses. `quick` (CPU, minutes), `full` (CPU), `gpu` (GPT-2 small, bf16), `tiny` (smoke tests)."""

    name: str
    dtype: str = "float32"
    # the model of the step and generate sections
    vocab_size: int = 4096
    n_embd: int = 384
    n_layer: int = 2
    n_head: int = 6
    state_size: int = 32
    batch: int = 8
    steps: int = 16
    repeats: int = 5
    # generate
    gen_positions: int = 512
    gen_latency_rounds: int = 30
    gen_budget_bytes: int = 2**30
    gen_context: int = 1024
    gen_batch_cap: int = 64
    gen_timed_steps: int = 3
    # art
    art_dim: int = 768
    art_categories: int = 1000
    art_updates: int = 2000
    art_reference_updates: int = 300
    fuzzy_categories: int = 300
    fuzzy_updates: int = 150
    fuzzy_reference_updates: int = 30
    # trainer (the tiny preset's dimensions)
    trainer_model: dict = field(
        default_factory=lambda: dict(vocab_size=4096, n_embd=128, n_layer=2, n_head=4, state_size=8)
    )
    trainer_batch: int = 8
    trainer_seq_len: int = 64
    trainer_steps: int = 10
    trainer_warmup_steps: int = 2
    trainer_repeats: int = 3

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def rows(self) -> int:
        """Rows of every GEMM in a step: batch x (M + 1)."""
        return self.batch * (self.state_size + 1)


SIZES = {
    "tiny": Sizes(
        name="tiny",
        vocab_size=97,
        n_embd=32,
        n_layer=2,
        n_head=4,
        state_size=3,
        batch=2,
        steps=3,
        repeats=2,
        gen_positions=16,
        gen_latency_rounds=3,
        gen_budget_bytes=2**20,
        gen_context=32,
        gen_batch_cap=4,
        gen_timed_steps=2,
        art_dim=16,
        art_categories=20,
        art_updates=40,
        art_reference_updates=40,
        fuzzy_categories=10,
        fuzzy_updates=20,
        fuzzy_reference_updates=20,
        trainer_model=dict(vocab_size=97, n_embd=32, n_layer=1, n_head=2, state_size=2),
        trainer_batch=2,
        trainer_seq_len=8,
        trainer_steps=2,
        trainer_warmup_steps=1,
        trainer_repeats=1,
    ),
    "quick": Sizes(name="quick"),
    "full": Sizes(
        name="full",
        vocab_size=50257,
        n_embd=768,
        n_layer=4,
        n_head=12,
        state_size=32,
        batch=8,
        steps=16,
        gen_positions=4096,
        gen_batch_cap=128,
        art_updates=5000,
        art_reference_updates=500,
        fuzzy_categories=1000,
        fuzzy_updates=500,
        fuzzy_reference_updates=100,
        trainer_steps=30,
        trainer_repeats=5,
    ),
    "gpu": Sizes(
        name="gpu",
        dtype="bfloat16",
        vocab_size=50257,
        n_embd=768,
        n_layer=12,
        n_head=12,
        state_size=32,
        batch=64,
        steps=32,
        repeats=10,
        gen_positions=4096,
        gen_batch_cap=4096,
        gen_timed_steps=10,
        art_updates=20000,
        art_reference_updates=500,
        fuzzy_categories=1000,
        fuzzy_updates=2000,
        fuzzy_reference_updates=100,
        trainer_steps=50,
        trainer_repeats=3,
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# The run's context


@dataclass
class Context:
    sizes: Sizes
    device: torch.device
    compile_mode: str | None = None  # torch.compile the GPTB step (GPTBModel.compile_step) with this mode

    @property
    def dtype(self) -> torch.dtype:
        return self.sizes.torch_dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def machine(self) -> dict:
        info = {
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        if self.cuda:
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks: --device cuda but torch sees no CUDA device")
    return torch.device(name)


def with_sizes(sizes: Sizes, **changes) -> Sizes:
    return replace(sizes, **changes)


def sizes_dict(sizes: Sizes) -> dict:
    return asdict(sizes)


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes (CUDA events on a GPU, with the queue drained before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def compare(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of each function, the functions interleaved: a, b, c, a, b, c, ..."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Models with the same weights


def gptb_config(sizes: Sizes, **overrides):
    from modeling_gptb import GPTBConfig

    fields = dict(
        vocab_size=sizes.vocab_size,
        n_embd=sizes.n_embd,
        n_layer=sizes.n_layer,
        n_head=sizes.n_head,
        state_size=sizes.state_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    return GPTBConfig(**{**fields, **overrides})


def gptb_model(ctx: Context, seed: int = 0, **overrides):
    """A GPTB LM of the run's sizes on its device and dtype (its step compiled if the run asks)."""
    from modeling_gptb import GPTBLMHeadModel

    torch.manual_seed(seed)
    model = GPTBLMHeadModel(gptb_config(ctx.sizes, **overrides)).to(device=ctx.device, dtype=ctx.dtype).eval()
    if ctx.compile_mode:
        model.transformer.compile_step(mode=None if ctx.compile_mode == "default" else ctx.compile_mode)
    return model


def gpt2_twin(gptb, cls_name: str = "GPT2Model", n_positions: int | None = None):
    """A stock transformers GPT-2 (`GPT2Model` or `GPT2LMHeadModel`) holding the GPTB model's weights."""
    import transformers

    config = gptb.config
    gpt2_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=n_positions or config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.n_inner,
        activation_function=config.activation_function,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=config.layer_norm_epsilon,
        bos_token_id=0,
        eos_token_id=0,
    )
    twin = getattr(transformers, cls_name)(gpt2_config)
    param = next(gptb.parameters())
    twin = twin.to(device=param.device, dtype=param.dtype).eval()
    source = gptb.transformer.state_dict()
    prefix = "transformer." if cls_name != "GPT2Model" else ""
    with torch.no_grad():
        for name, tensor in twin.state_dict().items():
            key = name.removeprefix(prefix)
            if name == "lm_head.weight":
                tensor.copy_(gptb.lm_head.weight)
            elif key in source:
                rows = min(tensor.shape[0], source[key].shape[0])
                tensor[:rows].copy_(source[key][:rows])
    return twin


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs


def step_gemms(sizes: Sizes, rows: int | None = None) -> list[tuple[int, int, int]]:
    """The (rows, in, out) of the GEMMs of one layer of one step: fused QKV, attention projection, MLP up and down
    (`rows`: the step's, batch x (M + 1), unless given)."""
    rows, d = rows or sizes.rows, sizes.n_embd
    return [(rows, d, 3 * d), (rows, d, d), (rows, d, 4 * d), (rows, 4 * d, d)]


def step_flops(sizes: Sizes) -> float:
    """Model FLOPs of one inference step of the batch (`modeling_gptb.throughput.forward_flops_per_token`)."""
    from modeling_gptb.throughput import forward_flops_per_token

    return sizes.batch * forward_flops_per_token(gptb_config(sizes))


def fmt_rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.2f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def row(
    measure: str, value: str, baseline: str = "", ratio: str = "", goal: str = "", met: bool | None = None
) -> dict:
    """One line of the table."""
    return {"measure": measure, "value": value, "baseline": baseline, "ratio": ratio, "goal": goal, "met": met}
