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


def reference_step(params, config, state, token_ids):
    """
    One GPTB step. `params`: the model's state dict (any dtype; read as float64), `state`: (B, M, D) or None for
    `initial_embeds`, `token_ids`: (B,). Returns `(logits (B, V), new_state (B, M, D))` in float64.
    """
    p = {name: tensor.detach().to(torch.float64) for name, tensor in params.items()}
    prefix = "transformer." if "transformer.wte.weight" in p else ""
    get = lambda name: p[prefix + name]  # noqa: E731
    M, D, H = config.state_size, config.n_embd, config.n_head
    batch = token_ids.shape[0]
    if state is None:
        state = get("initial_embeds").expand(batch, M, D)
    state = state.to(torch.float64)

    update = getattr(config, "state_update", "replace")
    gated = update == "gated"
    read = state * get("state_update.read_scale") if update != "replace" else state
    token_in = get("wte.weight")[token_ids]  # x, the token's input embedding (before positions)
    x = torch.cat([read, token_in[:, None, :]], dim=1)  # (B, M+1, D), token last
    x = x + get("wpe.weight")[: M + 1]
    eps = config.layer_norm_epsilon
    head_dim = D // H
    width = M + 1
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    for layer in range(config.n_layer):
        block = lambda name: get(f"h.{layer}.{name}")  # noqa: E731, B023
        h = _layer_norm(x, block("ln_1.weight"), block("ln_1.bias"), eps)
        qkv = h @ block("attn.c_attn.weight") + block("attn.c_attn.bias")  # Conv1D: weight is (in, out)
        q, k, v = qkv.split(D, dim=-1)
        q, k, v = (t.reshape(batch, width, H, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if not config.rebias:
            scores = scores.masked_fill(~causal, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, width, D)
        x = x + attended @ block("attn.c_proj.weight") + block("attn.c_proj.bias")
        h = _layer_norm(x, block("ln_2.weight"), block("ln_2.bias"), eps)
        h = _gelu_new(h @ block("mlp.c_fc.weight") + block("mlp.c_fc.bias"))
        x = x + h @ block("mlp.c_proj.weight") + block("mlp.c_proj.bias")
    out = _layer_norm(x, get("ln_f.weight"), get("ln_f.bias"), eps)
    lm_head = p.get("lm_head.weight", get("wte.weight"))
    new_state = out[:, :M]
    if gated:  # r = a * sigmoid(U W + b); S' = r * S + (1 - r) * U  (nn.Linear keeps W as (out, in))
        gate = torch.sigmoid(new_state @ get("state_update.gate.weight").T + get("state_update.gate.bias"))
        retain = get("state_update.retain") * gate
        new_state = retain * state + (1 - retain) * new_state
    if update in ("residual", "selective", "addressed"):
        # S' = a * S + (1 - a) * U + reshape(h W_w + b_w, (M, D)), h the token position's output
        write = out[:, M] @ get("state_update.write.weight").T + get("state_update.write.bias")
        write = write.reshape(batch, M, D)
        if update in ("selective", "addressed"):  # the write times z = sigmoid(g W_g + b_g), one gate per slot
            gate_in = token_in if update == "selective" else out[:, M]  # g: the input token or the output h
            z = torch.sigmoid(gate_in @ get("state_update.gate.weight").T + get("state_update.gate.bias"))
            write = z[:, :, None] * write
        retain = get("state_update.retain")
        new_state = retain * state + (1 - retain) * new_state + write
    return out[:, M] @ lm_head.T, new_state


def initial_state(params, config, batch):
    key = "transformer.initial_embeds" if "transformer.initial_embeds" in params else "initial_embeds"
    return params[key].detach().to(torch.float64).expand(batch, config.state_size, config.n_embd)


def reference_sequence(params, config, token_ids, state=None, attention_mask=None):
    """T reference steps in order; masked steps keep the state. Returns `(logits (B, T, V), final_state)`."""
    state = initial_state(params, config, token_ids.shape[0]) if state is None else state.to(torch.float64)
    logits = []
    for t in range(token_ids.shape[1]):
        step_logits, new_state = reference_step(params, config, state, token_ids[:, t])
        if attention_mask is not None:
            new_state = torch.where(attention_mask[:, t].bool()[:, None, None], new_state, state)
        state = new_state
        logits.append(step_logits)
    return torch.stack(logits, dim=1), state
