"""GPTB configuration: GPT-2's hyperparameters plus the recurrent state and the ART memory.

This file travels to the Hub as remote code: it imports only the standard library and transformers.
"""

import math

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .state_update import check_state_update_fields

ART_RULES = ("cosine", "fuzzy")
ART_MAX_BUFFER_BYTES = 2**30  # the bound on an ART memory's buffers: a config's, and a loaded file's by default
ART_EXEMPLAR_TOKENS = 16  # tokens of the input that created each category, kept to describe it


def art_buffer_bytes(max_categories: int, stored_dim: int, itemsize: int = 4) -> int:
    """Bytes of an ART memory's per-category buffers: prototypes (`stored_dim` values of `itemsize` bytes), counts,
    creation order and exemplar tokens (longs). What `ART_MAX_BUFFER_BYTES` bounds."""
    return max_categories * (stored_dim * itemsize + (2 + ART_EXEMPLAR_TOKENS) * 8)


ART_POOLINGS = ("mean", "state", "last", "mean_std_max")
# which hidden states art_pooling pools: the last layer, or the embeddings and every layer
ART_POOL_LAYERS = ("last", "all")
ART_INPUT_TRANSFORMS = ("none", "center", "euclidean", "standardize")  # as art_memory's (tested equal)
ART_LIFTED_TRANSFORMS = ("euclidean", "standardize")  # transforms that append the lift coordinate


def art_rule_dim(dim: int, input_transform: str) -> int:
    """Features the ART rule sees of a `dim`-wide row after `input_transform`: one more for the lift coordinate."""
    return dim + (input_transform in ART_LIFTED_TRANSFORMS)


# GPT-2 config keys that GPTB has no use for; dropped when converting a GPT-2 config.
_GPT2_ONLY_KEYS = (
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "add_cross_attention",
    "architectures",
    "model_type",
    "auto_map",
    "task_specific_params",
    "n_ctx",
)


class GPTBConfig(PretrainedConfig):
    r"""
    Configuration of a GPTB model: GPT-2 made recurrent (every field defined in `docs/design.md#configuration`).

    GPT-2's hyperparameters keep GPT-2's names, so a GPT-2 config converts one to one
    ([`GPTBConfig.from_gpt2_config`]). What is new:

    Args:
        state_size (`int`, defaults to 32):
            M, the number of state slots. Each step runs the blocks over a window of M + 1 positions (the state and
            the new token); the state of a sequence is M x n_embd numbers, whatever its length.
        rebias (`bool`, defaults to `True`):
            Bidirectional attention inside the window, so the state can read the new token. `False` keeps GPT-2's
            causal mask: the token sits last, so the state can then never read the input (a fidelity control only).
        state_update (`str`, defaults to `"replace"`):
            How a step makes the next state from the window's output at the state slots: `"replace"` (the original
            step: the output is the next state), `"gated"` (a learned read scale and a selective retain gate),
            `"residual"` (read scale, retain amplitude and an additive write from the token position's output; an
            experiment), `"selective"` (the `"residual"` write let in per slot by a gate that reads the input
            token; an experiment) or `"addressed"` (the same gate reading the token position's output, so a step
            picks its slot from what it has read; an experiment). Exact definitions in `state_update.py` and the
            design doc.
        state_gate_bias (`float`, defaults to 2.0):
            `"gated"`: initial bias of the retain gate (sigmoid(2) = 0.88 of the state kept once the gate is open).
            `"selective"`, `"addressed"`: initial bias of the write gate (sigmoid(2) = 0.88 of the write let in; a
            large negative value starts with the gate closed).
        state_retain_init (`float`, defaults to 0.0):
            `"gated"`, `"residual"`, `"selective"` and `"addressed"`: initial retain amplitude; 0 starts exactly as
            the original step (a GPT-2 warm start runs unchanged), 1 starts as a retain gate (`"residual"`: as
            S' = S + write, `"selective"` and `"addressed"`: as S' = S + z * write).
        state_read_scale_init (`float`, defaults to 1.0):
            `"gated"`, `"residual"`, `"selective"` and `"addressed"`: initial scale of the state as it enters the
            window; 1 is the original step, a small value (0.02) lets each token's write count against a state of norm
            sqrt(n_embd).
        segment_length (`int`, defaults to 1):
            K, the tokens a step reads. 1: the one-token step over the window `[state; token]` (M + 1 positions).
            K > 1: a segment step (RMT's layout) over `[read slots; K tokens; write slots]` (2M + K positions), the
            tokens causal among themselves, the next state read from the write slots (docs/design.md#segment-steps).
        state_write_loss (`float`, defaults to 0.0):
            Weight of the write target (`segment_length` > 1 only): each complete segment's new state, the mean of
            its slots through the `write_probe` head, predicts which token ids the segment held (multi-hot binary
            cross-entropy), added to the loss in training (docs/design.md#the-write-target). 0: no head, no target.
        bptt_steps (`int`, *optional*):
            Truncated backpropagation through time: the state is detached every `bptt_steps` steps (segments when
            `segment_length` > 1) of a forward call. `None` backpropagates through the whole call.
        checkpoint_every_steps (`int`, *optional*):
            With activation checkpointing on (`model.activation_checkpointing_enable()`), in training: keep the state
            only every `checkpoint_every_steps` steps and recompute that many steps at a time in the backward pass.
            `None`: every step (the same as 1).
        n_positions (`int`, defaults to 1024):
            Rows of the position table `wpe`. A step reads only the first M + 1 (2M + K for segment steps), so this
            bounds `state_size` and `segment_length` (`state_size + 1 <= n_positions`, `2 * state_size +
            segment_length <= n_positions` when `segment_length > 1`), not the sequence length: GPTB has no context
            limit. Kept at GPT-2's size so GPT-2 weights load unchanged (docs/design.md#configuration).
        art_enabled (`bool`, defaults to `False`):
            Give the model an [`ARTMemory`] (`model.art_memory`) fed with a pooled representation of each sequence
            in training mode.
        art_rule (`str`, defaults to `"cosine"`): `"cosine"` or `"fuzzy"`.
        art_vigilance (`float`, defaults to 0.75): resonance threshold in [0, 1].
        art_beta (`float`, *optional*): learning rate in [0, 1]; `None` takes the rule's default.
        art_alpha (`float`, defaults to 1e-3): Fuzzy ART's choice parameter (> 0).
        art_max_categories (`int`, defaults to 1024): capacity of the memory.
        art_pooling (`str`, defaults to `"mean"`): `"mean"` (valid steps of the last layer at the token position),
            `"state"` (mean of the final state's slots), `"last"` (the last valid step) or `"mean_std_max"` (the mean,
            standard deviation and maximum over the valid steps, concatenated).
        art_pool_layers (`str`, defaults to `"last"`): which hidden states the pooling reads: `"last"` (the last
            layer's output) or `"all"` (the embeddings and every layer's output, concatenated); the memory's width is
            `art_input_dim`.
        art_input_transform (`str`, defaults to `"none"`): what the memory's rule sees of the pooled vector:
            `"none"`, `"center"`, `"euclidean"` or `"standardize"` (docs/design.md#what-the-memory-sees); all but
            `"none"` are fitted by `fit_art_memory`.
        art_lift (`float`, defaults to 4.0): the constant coordinate of the `"euclidean"` and `"standardize"`
            transforms (> 0, finite).
        art_loss_weight (`float`, defaults to 0.0): weight of the coupled loss pulling each sequence toward its
            category's prototype.
        art_resonated_weight (`float`, defaults to 1.0): continual-learning gate; loss weight of sequences that
            resonated with a known category (1.0 = off, 0.0 = learn only from novel sequences).
        art_learn_in_eval (`bool`, defaults to `False`): let the memory learn in eval mode too.
        decode_cuda_graph (`bool`, defaults to `False`): on CUDA, `generate()`'s one-token steps replay a CUDA graph
            captured once per batch size, dtype and device instead of launching the step's kernels one by one.
        loss_chunk_size (`int`, *optional*): in training, with `labels`, compute the loss `loss_chunk_size` target
            positions at a time, each chunk's logits remade in the backward pass, so the `(batch, steps, vocab)`
            logits are never whole; the output's `logits` is then `None`. `None`: the plain path.

    Example:

    ```python
    >>> from modeling_gptb import GPTBConfig, GPTBLMHeadModel
    >>> config = GPTBConfig(n_embd=128, n_layer=2, n_head=4, state_size=8)
    >>> model = GPTBLMHeadModel(config)
    ```
    """

    model_type = "gptb"
    # no `max_position_embeddings` alias on purpose: GPTB has no length limit, and generate() would impose one
    keys_to_ignore_at_inference = ["cache", "past_hidden_states", "art_category", "art_status"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        state_size=32,
        rebias=True,
        state_update="replace",
        state_gate_bias=2.0,
        state_retain_init=0.0,
        state_read_scale_init=1.0,
        segment_length=1,
        state_write_loss=0.0,
        bptt_steps=None,
        checkpoint_every_steps=None,
        use_cache=True,
        art_enabled=False,
        art_rule="cosine",
        art_vigilance=0.75,
        art_beta=None,
        art_alpha=1e-3,
        art_max_categories=1024,
        art_pooling="mean",
        art_pool_layers="last",
        art_input_transform="none",
        art_lift=4.0,
        art_loss_weight=0.0,
        art_resonated_weight=1.0,
        art_learn_in_eval=False,
        decode_cuda_graph=False,
        loss_chunk_size=None,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=None,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.state_size = state_size
        self.rebias = rebias
        self.state_update = state_update
        self.state_gate_bias = state_gate_bias
        self.state_retain_init = state_retain_init
        self.state_read_scale_init = state_read_scale_init
        self.segment_length = segment_length
        self.state_write_loss = state_write_loss
        self.bptt_steps = bptt_steps
        self.checkpoint_every_steps = checkpoint_every_steps
        self.use_cache = use_cache
        self.art_enabled = art_enabled
        self.art_rule = art_rule
        self.art_vigilance = art_vigilance
        self.art_beta = art_beta
        self.art_alpha = art_alpha
        self.art_max_categories = art_max_categories
        self.art_pooling = art_pooling
        self.art_pool_layers = art_pool_layers
        self.art_input_transform = art_input_transform
        self.art_lift = art_lift
        self.art_loss_weight = art_loss_weight
        self.art_resonated_weight = art_resonated_weight
        self.art_learn_in_eval = art_learn_in_eval
        self.decode_cuda_graph = decode_cuda_graph
        self.loss_chunk_size = loss_chunk_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(**kwargs)
        self.check_values()

    @property
    def window_size(self) -> int:
        """Positions of a step's window: M + 1 for the one-token step, 2M + K for a segment step."""
        if self.segment_length == 1:
            return self.state_size + 1
        return 2 * self.state_size + self.segment_length

    @property
    def art_input_dim(self) -> int:
        """Width of the pooled vector the ART memory is given (docs/design.md#art-inside-gptb)."""
        if self.art_pooling == "state":
            return self.n_embd
        statistics = 3 if self.art_pooling == "mean_std_max" else 1
        layers = self.n_layer + 1 if self.art_pool_layers == "all" else 1
        return self.n_embd * statistics * layers

    def check_values(self):
        """Raise a `ValueError` naming the first field outside its allowed range."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTBConfig.{name} must be an integer >= 1, got {value!r}")

        def unit_interval(name, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"GPTBConfig.{name} must be a number in [0, 1], got {value!r}")

        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "state_size", "art_max_categories"):
            positive_int(name)
        positive_int("segment_length")
        if self.n_inner is not None:
            positive_int("n_inner")
        for name in ("bptt_steps", "checkpoint_every_steps", "loss_chunk_size"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTBConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"choose n_head among the divisors of {self.n_embd}"
            )
        if self.n_positions < self.window_size:
            what = "state_size + 1" if self.segment_length == 1 else "2 * state_size + segment_length"
            raise ValueError(
                f"GPTBConfig.n_positions ({self.n_positions}) must be >= {what} ({self.window_size}): "
                f"each step reads a window of {what} positions"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "art_vigilance", "art_resonated_weight"):
            unit_interval(name)
        unit_interval("art_beta", optional=True)

        def finite_number(name, low, low_inclusive):
            value = getattr(self, name)
            bound = f"{'>=' if low_inclusive else '>'} {low}"
            is_number = not isinstance(value, bool) and isinstance(value, (int, float))
            if not (is_number and math.isfinite(value) and (value >= low if low_inclusive else value > low)):
                raise ValueError(f"GPTBConfig.{name} must be {bound} and finite, got {value!r}")

        finite_number("layer_norm_epsilon", 0, low_inclusive=False)
        finite_number("initializer_range", 0, low_inclusive=True)
        finite_number("art_alpha", 0, low_inclusive=False)
        finite_number("art_loss_weight", 0, low_inclusive=True)
        finite_number("art_lift", 0, low_inclusive=False)
        finite_number("state_write_loss", 0, low_inclusive=True)
        if self.state_write_loss > 0 and self.segment_length == 1:
            raise ValueError(
                f"GPTBConfig.state_write_loss={self.state_write_loss!r} needs segment steps (segment_length > 1): "
                "the write target asks each segment's new state which tokens the segment held; set segment_length "
                "or leave state_write_loss at 0"
            )
        if self.art_input_transform not in ART_INPUT_TRANSFORMS:
            raise ValueError(
                f"GPTBConfig.art_input_transform must be one of {ART_INPUT_TRANSFORMS}, got "
                f"{self.art_input_transform!r}"
            )
        if self.art_input_transform != "none" and self.art_rule != "cosine":
            raise ValueError(
                f"GPTBConfig.art_input_transform={self.art_input_transform!r} needs art_rule='cosine', got "
                f"{self.art_rule!r}"
            )
        if self.art_rule not in ART_RULES:
            raise ValueError(f"GPTBConfig.art_rule must be one of {ART_RULES}, got {self.art_rule!r}")
        if self.art_enabled:  # refused before the model allocates the memory's buffers (float32 prototypes)
            rule_dim = art_rule_dim(self.art_input_dim, self.art_input_transform)
            stored_dim = rule_dim * (2 if self.art_rule == "fuzzy" else 1)
            needed = art_buffer_bytes(self.art_max_categories, stored_dim)
            if needed > ART_MAX_BUFFER_BYTES:
                raise ValueError(
                    f"GPTBConfig.art_max_categories={self.art_max_categories} with art_input_dim="
                    f"{self.art_input_dim} needs "
                    f"{needed:,} bytes of ART memory buffers, above the 1 GiB bound; at most "
                    f"{ART_MAX_BUFFER_BYTES // art_buffer_bytes(1, stored_dim):,} categories"
                )
        if self.art_pooling not in ART_POOLINGS:
            raise ValueError(f"GPTBConfig.art_pooling must be one of {ART_POOLINGS}, got {self.art_pooling!r}")
        if self.art_pool_layers not in ART_POOL_LAYERS:
            raise ValueError(
                f"GPTBConfig.art_pool_layers must be one of {ART_POOL_LAYERS}, got {self.art_pool_layers!r}"
            )
        if self.art_pooling == "state" and self.art_pool_layers != "last":
            raise ValueError(
                "GPTBConfig.art_pooling='state' pools the final state, not the layers' outputs: "
                f"art_pool_layers must be 'last', got {self.art_pool_layers!r}"
            )
        if not isinstance(self.activation_function, str) or self.activation_function not in ACT2FN:
            raise ValueError(
                f"GPTBConfig.activation_function must be one of transformers' activations "
                f"({', '.join(sorted(ACT2FN))}), got {self.activation_function!r}"
            )
        # a string such as "no" is truthy: refuse anything but a real bool
        for name in (
            "rebias",
            "use_cache",
            "art_enabled",
            "art_learn_in_eval",
            "tie_word_embeddings",
            "decode_cuda_graph",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTBConfig.{name} must be True or False, got {getattr(self, name)!r}")
        check_state_update_fields(self)

    @classmethod
    def from_gpt2_config(cls, gpt2_config, **overrides):
        """Convert a GPT-2 config (a `GPT2Config` or its dict) to a `GPTBConfig`; `overrides` set GPTB's own fields."""
        values = gpt2_config if isinstance(gpt2_config, dict) else gpt2_config.to_dict()
        values = {key: value for key, value in values.items() if key not in _GPT2_ONLY_KEYS}
        values.pop("transformers_version", None)
        values.update(overrides)
        return cls(**values)


__all__ = ["GPTBConfig"]
