"""Next-token cross-entropy over chunks of positions, so the (batch, steps, vocab_size) logits are never whole.

With a 50,257-token vocabulary the logits and their gradient outweigh a large batch's activations. Each chunk's
logits are made, scored and dropped in the forward pass and made again in the backward pass (activation
checkpointing of `lm_head` + cross-entropy): one extra `lm_head` matmul for memory that no longer grows with
batch x steps x vocab_size. Used by `GPTBLMHeadModel` in training when `config.loss_chunk_size` is set.

This file travels to the Hub as remote code: it imports only the standard library and torch.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden, weight, targets, target_weights, ignore_index):
    logits = F.linear(hidden, weight)
    # the plain path upcasts bf16/fp16 logits to float32; float64 stays float64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    per_token = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if target_weights is not None:
        per_token = per_token * target_weights
    return per_token.sum()


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.LongTensor,
    chunk_size: int,
    num_items_in_batch=None,
    sequence_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """
    The loss of `ForCausalLMLoss(F.linear(hidden, weight), labels)` (labels shifted inside, `ignore_index` skipped,
    summed and divided by `num_items_in_batch`, or by the number of counted targets), computed `chunk_size` target
    positions at a time over the flattened (batch, steps - 1) targets.

    Args:
        hidden: `(batch_size, steps, n_embd)`, what `lm_head` reads.
        weight: `(vocab_size, n_embd)`, `lm_head.weight`.
        labels: `(batch_size, steps)`; position `t + 1` is the target of position `t`.
        sequence_weights: `(batch_size,)` loss weight of each sequence (the ART gate), or None for all 1.
    """
    targets = labels[:, 1:].to(hidden.device)
    flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    flat_weights = None
    if sequence_weights is not None:
        flat_weights = sequence_weights.to(hidden.device)[:, None].expand_as(targets).reshape(-1)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, flat_targets.shape[0], chunk_size):
        piece = slice(start, start + chunk_size)
        chunk_weights = None if flat_weights is None else flat_weights[piece]
        total = total + checkpoint(
            _chunk_loss_sum,
            flat_hidden[piece],
            weight,
            flat_targets[piece],
            chunk_weights,
            ignore_index,
            use_reentrant=False,
        )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != ignore_index).sum()
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


__all__ = ["chunked_causal_lm_loss"]
