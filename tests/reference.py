"""The GPTB step written from docs/design.md#the-step in plain torch, float64, from a state dict: the tests' reference.

Nothing here calls the package's code: it reads the weights by their GPT-2 names and does the arithmetic itself.
"""

import math

import torch


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _params(params):
    """The state dict in float64, read by GPT-2 names with or without the `transformer.` prefix."""
    p = {name: tensor.detach().to(torch.float64) for name, tensor in params.items()}
    prefix = "transformer." if "transformer.wte.weight" in p else ""
    return p, lambda name: p[prefix + name]


def _blocks_and_ln_f(get, config, x, allowed):
    """The GPT-2 blocks and ln_f over windows `x` (B, W, D); `allowed` (W, W) or (B, W, W): True where the query (row)
    may read the key (column)."""
    batch, width, D = x.shape
    H = config.n_head
    eps = config.layer_norm_epsilon
    head_dim = D // H
    for layer in range(config.n_layer):
        block = lambda name: get(f"h.{layer}.{name}")  # noqa: E731, B023
        h = _layer_norm(x, block("ln_1.weight"), block("ln_1.bias"), eps)
        qkv = h @ block("attn.c_attn.weight") + block("attn.c_attn.bias")  # Conv1D: weight is (in, out)
        q, k, v = qkv.split(D, dim=-1)
        q, k, v = (t.reshape(batch, width, H, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed.reshape(-1, 1, width, width), float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, width, D)
        x = x + attended @ block("attn.c_proj.weight") + block("attn.c_proj.bias")
        h = _layer_norm(x, block("ln_2.weight"), block("ln_2.bias"), eps)
        h = _gelu_new(h @ block("mlp.c_fc.weight") + block("mlp.c_fc.bias"))
        x = x + h @ block("mlp.c_proj.weight") + block("mlp.c_proj.bias")
    return _layer_norm(x, get("ln_f.weight"), get("ln_f.bias"), eps)


def _read(get, config, state):
    """The state as the window reads it: s * S for every variant but the seed's."""
    return state * get("state_update.read_scale") if getattr(config, "state_update", "replace") != "replace" else state


def _next_state(get, config, state, slots, token_out, token_in):
    """The state update of `config.state_update` from the output at the state (write) slots U = `slots`, the output
    at the token position h = `token_out` and the token's input embedding x = `token_in`."""
    update = getattr(config, "state_update", "replace")
    batch, M, D = slots.shape
    new_state = slots
    if update == "gated":  # r = a * sigmoid(U W + b); S' = r * S + (1 - r) * U  (nn.Linear keeps W as (out, in))
        gate = torch.sigmoid(slots @ get("state_update.gate.weight").T + get("state_update.gate.bias"))
        retain = get("state_update.retain") * gate
        new_state = retain * state + (1 - retain) * slots
    if update in ("residual", "selective", "addressed"):
        # S' = a * S + (1 - a) * U + reshape(h W_w + b_w, (M, D)), h the token position's output
        write = token_out @ get("state_update.write.weight").T + get("state_update.write.bias")
        write = write.reshape(batch, M, D)
        if update in ("selective", "addressed"):  # the write times z = sigmoid(g W_g + b_g), one gate per slot
            gate_in = token_in if update == "selective" else token_out  # g: the input token or the output h
            z = torch.sigmoid(gate_in @ get("state_update.gate.weight").T + get("state_update.gate.bias"))
            write = z[:, :, None] * write
        retain = get("state_update.retain")
        new_state = retain * state + (1 - retain) * slots + write
    return new_state


def _lm_head(p, get):
    return p.get("lm_head.weight", get("wte.weight"))


def reference_step(params, config, state, token_ids):
    """
    One GPTB step. `params`: the model's state dict (any dtype; read as float64), `state`: (B, M, D) or None for
    `initial_embeds`, `token_ids`: (B,). Returns `(logits (B, V), new_state (B, M, D))` in float64.
    """
    p, get = _params(params)
    M, D = config.state_size, config.n_embd
    batch = token_ids.shape[0]
    if state is None:
        state = get("initial_embeds").expand(batch, M, D)
    state = state.to(torch.float64)
    token_in = get("wte.weight")[token_ids]  # x, the token's input embedding (before positions)
    x = torch.cat([_read(get, config, state), token_in[:, None, :]], dim=1)  # (B, M+1, D), token last
    x = x + get("wpe.weight")[: M + 1]
    width = M + 1
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    allowed = torch.ones(width, width, dtype=torch.bool) if config.rebias else causal
    out = _blocks_and_ln_f(get, config, x, allowed)
    new_state = _next_state(get, config, state, out[:, :M], out[:, M], token_in)
    return out[:, M] @ _lm_head(p, get).T, new_state


def segment_allowed(M, K, r, rebias):
    """
    The mask of a segment window for r <= K tokens, written out cell by cell from docs/design.md#segment-steps:
    positions 0..M-1 are the read slots, M..M+r-1 the tokens, M+r..2M+r-1 the write slots.
    """
    width = 2 * M + r

    def kind(i):
        return ("read", i) if i < M else ("token", i - M) if i < M + r else ("write", i - M - r)

    allowed = torch.zeros(width, width, dtype=torch.bool)
    for row in range(width):
        for col in range(width):
            (q, qi), (k, ki) = kind(row), kind(col)
            if not rebias:
                allowed[row, col] = col <= row
            elif q == "read":
                allowed[row, col] = k == "read"
            elif q == "token":
                allowed[row, col] = k == "read" or (k == "token" and ki <= qi)
            else:
                allowed[row, col] = True
    return allowed


def reference_segment(params, config, state, token_ids):
    """
    One segment step over r = token_ids.shape[1] <= K tokens (r < K: a partial segment, whose window shrinks to
    2M + r with the write slots keeping their positions M+K..2M+K-1). Returns `(logits (B, r, V), new_state)`.
    """
    p, get = _params(params)
    M, D, K = config.state_size, config.n_embd, config.segment_length
    batch, r = token_ids.shape
    assert 1 <= r <= K
    if state is None:
        state = get("initial_embeds").expand(batch, M, D)
    state = state.to(torch.float64)
    wpe = get("wpe.weight")
    read = _read(get, config, state)
    token_in = get("wte.weight")[token_ids]  # (B, r, D)
    x = torch.cat([read + wpe[:M], token_in + wpe[M : M + r], read + wpe[M + K : 2 * M + K]], dim=1)
    out = _blocks_and_ln_f(get, config, x, segment_allowed(M, K, r, config.rebias))
    tokens_out = out[:, M : M + r]
    # the state update's token position is the segment's last token
    new_state = _next_state(get, config, state, out[:, M + r :], tokens_out[:, -1], token_in[:, -1])
    return tokens_out @ _lm_head(p, get).T, new_state


def initial_state(params, config, batch):
    key = "transformer.initial_embeds" if "transformer.initial_embeds" in params else "initial_embeds"
    return params[key].detach().to(torch.float64).expand(batch, config.state_size, config.n_embd)


def reference_sequence(params, config, token_ids, state=None, attention_mask=None):
    """
    A whole sequence in order: one-token steps (K = 1; masked steps keep the state), or segment steps of K tokens
    (K > 1) from each row's first unmasked token, masked tokens taken out, a last partial segment written into the
    final state. Returns `(logits (B, T, V), final_state)`; logits at masked positions are not specified (zero here).
    """
    state = initial_state(params, config, token_ids.shape[0]) if state is None else state.to(torch.float64)
    K = getattr(config, "segment_length", 1)
    if K > 1:
        rows = [_segment_row(params, config, token_ids, state, attention_mask, b) for b in range(token_ids.shape[0])]
        return torch.stack([row[0] for row in rows]), torch.stack([row[1] for row in rows])
    logits = []
    for t in range(token_ids.shape[1]):
        step_logits, new_state = reference_step(params, config, state, token_ids[:, t])
        if attention_mask is not None:
            new_state = torch.where(attention_mask[:, t].bool()[:, None, None], new_state, state)
        state = new_state
        logits.append(step_logits)
    return torch.stack(logits, dim=1), state


def _segment_row(params, config, token_ids, state, attention_mask, b):
    """Row b alone: its unmasked tokens, cut into segments of K."""
    K = config.segment_length
    kept = torch.arange(token_ids.shape[1])
    if attention_mask is not None:
        kept = kept[attention_mask[b].bool()]
    row_state = state[b : b + 1]
    logits = torch.zeros(token_ids.shape[1], config.vocab_size, dtype=torch.float64)
    for start in range(0, len(kept), K):
        positions = kept[start : start + K]
        segment_logits, row_state = reference_segment(params, config, row_state, token_ids[b : b + 1, positions])
        logits[positions] = segment_logits[0]
    return logits, row_state[0]
