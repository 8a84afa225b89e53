"""The hardware ceiling: the machine's matmul rate at the GEMM shapes of one GPTB step, in the run's dtype.

Each shape is `bias + x @ W` (Conv1D's addmm) with x of `rows = batch * (M + 1)` rows. The step ceiling is the rate of
one step's GEMMs run back to back: every layer's fused QKV, attention projection, MLP up and MLP down.
"""

import torch

from .common import Context, compare, fmt_rate, row, step_gemms


def gemm_set(ctx: Context, rows: int | None = None):
    """A function that runs one step's GEMMs (n_layer x the four shapes; `rows` rows, the step's unless given), and
    their FLOPs."""
    shapes = step_gemms(ctx.sizes, rows)
    operands = [
        (
            torch.randn(out, device=ctx.device, dtype=ctx.dtype),
            torch.randn(rows, inner, device=ctx.device, dtype=ctx.dtype),
            torch.randn(inner, out, device=ctx.device, dtype=ctx.dtype) / inner**0.5,
        )
        for rows, inner, out in shapes
    ]
    layers = ctx.sizes.n_layer

    def run():
        for _ in range(layers):
            for bias, x, weight in operands:
                torch.addmm(bias, x, weight)

    flops = layers * sum(2 * rows * inner * out for rows, inner, out in shapes)
    return run, flops


def run(ctx: Context) -> dict:
    sizes = ctx.sizes
    names = ["qkv D->3D", "attn proj D->D", "mlp up D->4D", "mlp down 4D->D"]
    fns, flops = {}, {}
    for name, (rows, inner, out) in zip(names, step_gemms(sizes), strict=True):
        bias = torch.randn(out, device=ctx.device, dtype=ctx.dtype)
        x = torch.randn(rows, inner, device=ctx.device, dtype=ctx.dtype)
        weight = torch.randn(inner, out, device=ctx.device, dtype=ctx.dtype)
        # a few calls per timing so the smallest shape is not all timer overhead
        fns[name] = lambda bias=bias, x=x, weight=weight: [torch.addmm(bias, x, weight) for _ in range(4)]
        flops[name] = 4 * 2 * rows * inner * out
    step_set, step_flops = gemm_set(ctx)
    fns["step GEMMs"], flops["step GEMMs"] = step_set, step_flops
    times = compare(fns, ctx.device, repeats=max(sizes.repeats, 5), warmup=2)
    rates = {name: flops[name] / times[name] for name in fns}
    lines = [row(f"{name} ({sizes.rows} rows, {sizes.dtype})", fmt_rate(rates[name])) for name in names]
    lines.append(row(f"ceiling: one step's GEMMs x{sizes.n_layer} layers", fmt_rate(rates["step GEMMs"])))
    return {"rows": lines, "data": {"rates_flops_per_s": rates, "rows": sizes.rows}}
