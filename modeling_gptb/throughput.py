"""Training throughput: model FLOPs per token of a GPTB step and model FLOPs utilisation (MFU) against a peak.

Model FLOPs count the work the model defines (matmuls and attention), not what an implementation adds (activation
checkpointing's recomputation, the chunked loss's second `lm_head` pass), as in the PaLM paper's MFU.
"""

import torch

# Dense bf16 tensor-core peaks of the data sheets, in TFLOP/s, by a name `torch.cuda.get_device_name()` contains.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def forward_flops_per_token(config) -> float:
    """
    FLOPs of the forward per token: every block over a step's window (the weight matmuls, 2 FLOPs per multiply-add,
    and the attention scores and weighted values over the whole window) and the state update's projections, once per
    step, shared by its `segment_length` K tokens; and `lm_head` at each token. The window is M + 1 positions for the
    one-token step, 2M + K for a segment step, so a segment step costs (2M + K) / K positions of GPT-2's work per
    token plus attention over the window (docs/design.md#segment-steps).
    Embeddings, LayerNorms, softmax, activations and biases are left out (a few percent).
    """
    width, dim = config.window_size, config.n_embd
    inner = config.n_inner if config.n_inner is not None else 4 * dim
    weights_per_layer = 3 * dim * dim + dim * dim + 2 * dim * inner  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    blocks = 2 * weights_per_layer * width * config.n_layer
    attention = 2 * 2 * width * width * dim * config.n_layer  # Q K^T and A V
    lm_head = 2 * dim * config.vocab_size
    return (blocks + attention + state_update_flops(config)) / config.segment_length + lm_head


def state_update_flops(config) -> int:
    """Matmul FLOPs of one step's state update (`config.state_update`, modeling_gptb/state_update.py), once per
    step: per segment for segment steps."""
    slots, dim = config.state_size, config.n_embd
    write = 2 * dim * slots * dim  # h W_w: one (D -> M D) projection of the token position's output
    return {
        "replace": 0,
        "gated": 2 * slots * dim * dim,  # the retain gate, (D -> D) at every slot
        "residual": write,
        "selective": write + 2 * dim * slots,  # and the write gate, (D -> M)
        "addressed": write + 2 * dim * slots,
    }[config.state_update]


def train_flops_per_token(config) -> float:
    """Forward and backward: the backward pass costs twice the forward."""
    return 3.0 * forward_flops_per_token(config)


def peak_flops(device: torch.device | str, peak_tflops: float | None = None) -> float | None:
    """The peak to measure against, in FLOP/s: `peak_tflops` if given, else the table's for this GPU, else None."""
    if peak_tflops is not None:
        if not peak_tflops > 0:
            raise ValueError(f"the peak must be > 0 TFLOP/s, got {peak_tflops!r}")
        return peak_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def model_flops_utilization(config, tokens_per_s: float, peak: float | None) -> float | None:
    """The share of `peak` FLOP/s that `tokens_per_s` training tokens a second use; None without a peak."""
    if peak is None:
        return None
    return tokens_per_s * train_flops_per_token(config) / peak


__all__ = [
    "forward_flops_per_token",
    "model_flops_utilization",
    "peak_flops",
    "state_update_flops",
    "train_flops_per_token",
]
