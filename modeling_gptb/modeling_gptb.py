"""GPTB: GPT-2 made recurrent.

Each step reads one token and a fixed-size state of M vectors (the model's own previous outputs), runs GPT-2 blocks
over that window of M + 1 positions and emits the logits for the next token and the next state. The exact step is
in `docs/design.md#the-step`; the step itself (its window, mask and loop) is in `recurrent_step.py`, this file has the
transformers plumbing. Parameter names and layout are GPT-2's, so a GPT-2 checkpoint warm-starts it.

This file travels to the Hub as remote code: it imports only the standard library, torch, transformers and its
sibling files.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput, cached_file
from transformers.utils.deprecation import deprecate_kwarg

from .art_file import saved_weights_sha256
from .art_memory import ART_EXEMPLAR_TOKENS, ART_MEMORY_FILE, ARTMemory, ARTOutput, ARTStatus
from .chunked_loss import chunked_causal_lm_loss
from .configuration_gptb import GPTBConfig
from .cuda_graphs import DecodeGraphs
from .recurrent_step import RecurrentSteps
from .remote_card import short_model_card
from .state_update import (
    GatedStateUpdate,
    ResidualStateUpdate,
    SelectiveStateUpdate,
    StateUpdate,
    build_state_update,
)
from .validation import (
    INDEX_DTYPES,
    ValueChecks,
    check_binary_mask,
    check_extra_kwargs,
    check_finite,
    check_logits_to_keep,
    check_token_ids,
)

# generate() hands the state over as `cache` from transformers 5.24 on; older versions would silently drop it
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 24):
    raise ImportError(
        f"GPTB needs transformers >= 5.24 (found {transformers.__version__}): pip install -U 'transformers>=5.24,<6'"
    )

# from_pretrained arguments that say where and how to fetch files
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# `past_key_values=` is the old name of `cache=`: one removal version for forward and generate (transformers' own)
PAST_KEY_VALUES_REMOVED_IN = "6.0.0"

# ---------------------------------------------------------------------------------------------------------------------
# Outputs and the generation cache


@dataclass
class GPTBModelOutput(ModelOutput):
    """
    Output of [`GPTBModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, n_embd)`):
            The last layer's output (after `ln_f`) at the token position of each step.
        past_hidden_states (`torch.FloatTensor` of shape `(batch_size, state_size, n_embd)`):
            The state after the last step: pass it back to continue the sequences.
        cache ([`GPTBCache`], *optional*):
            The same state wrapped for `generate()`, with the number of positions consumed.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The window input and each block's output at the token position of each step, `(batch_size,
            sequence_length, n_embd)` each; the last one is after `ln_f` (GPT-2's convention).
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Each block's attention weights over the window at each step, `(batch_size, n_head, sequence_length,
            state_size + 1, state_size + 1)` each (the window's last position is the token); with segment steps,
            `(batch_size, n_head, n_segments, 2 * state_size + segment_length, 2 * state_size + segment_length)`.
        written_states (`torch.FloatTensor` of shape `(batch_size, n_segments, state_size, n_embd)`, *optional*):
            with `output_written_states` (segment steps): the state each segment of the call wrote.
        written_positions (`torch.LongTensor` of shape `(batch_size, n_segments, segment_length)`, *optional*):
            with `output_written_states`: the position in `input_ids` of each token a segment read, -1 where it read
            none of this call's tokens (a masked step, the padding of a last partial segment, a cached token).
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_hidden_states: torch.FloatTensor | None = None
    cache: "GPTBCache | None" = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    written_states: torch.FloatTensor | None = None
    written_positions: torch.LongTensor | None = None


@dataclass
class GPTBCausalLMOutput(ModelOutput):
    """
    Output of [`GPTBLMHeadModel`].

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*): language-modelling loss (plus the ART coupled loss).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): next-token scores.
        past_hidden_states (`torch.FloatTensor` of shape `(batch_size, state_size, n_embd)`): the final state.
        cache ([`GPTBCache`], *optional*): the final state wrapped for `generate()`.
        hidden_states, attentions (`tuple(torch.FloatTensor)`, *optional*): see [`GPTBModelOutput`].
        art_category, art_status, art_novelty (`torch.Tensor` of shape `(batch_size,)`, *optional*):
            what the ART memory made of each sequence (when `config.art_enabled`); a sequence without a valid step
            (`attention_mask` all 0) is skipped: category -1, status -1, novelty NaN.
        state_write_loss (`torch.FloatTensor` of shape `()`, *optional*): with `config.state_write_loss` > 0, in
            training or with `labels`: the write target's binary cross-entropy, unweighted (`loss` holds it times
            the weight in training).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_hidden_states: torch.FloatTensor | None = None
    cache: "GPTBCache | None" = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    art_category: torch.LongTensor | None = None
    art_status: torch.LongTensor | None = None
    art_novelty: torch.FloatTensor | None = None
    state_write_loss: torch.FloatTensor | None = None

    def art_status_names(self) -> list[str] | None:
        """`art_status` by name ("resonated", "new", "rejected"; "skipped" for a sequence without a valid step)."""
        if self.art_status is None:
            return None
        return [str(ARTStatus(code)) if code >= 0 else "skipped" for code in self.art_status.tolist()]


class GPTBCache:
    """
    The recurrent state as `generate()`'s cache: `(batch_size, state_size, n_embd)`, the same size at token 10 and
    token 100,000. `get_seq_length()` counts the positions consumed so `generate()` feeds only new tokens, and
    `reorder_cache()` follows beam search. With segment steps it also holds the current partial segment (its token
    embeddings, and the keys and values of its window so far), which the next call completes.
    """

    is_compileable = False
    is_croppable = False
    # generate() skips the prompt positions already consumed only for caches that are not all linear attention (its
    # name for recurrent states that do not count positions); this one counts them, so it wants the skip.
    is_linear = [False]

    def __init__(
        self,
        state: torch.Tensor,
        seq_length: int,
        pending: torch.Tensor | None = None,
        pending_mask: torch.Tensor | None = None,
        keys_values: list | None = None,
    ):
        if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 0:
            raise ValueError(
                f"GPTBCache seq_length must be an int >= 0 (the positions the state has consumed), got {seq_length!r}"
            )
        self.state = state
        self.seq_length = seq_length
        # segment steps: the token embeddings of the current partial segment (B, P, D), which the next call completes,
        # and which of them are tokens (B, P) where rows differ (None: all); and per block the keys and values of the
        # segment's read slots and those tokens, so a decoded token costs one position (None: built when needed)
        self.pending = pending
        self.pending_mask = pending_mask
        self.keys_values = keys_values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def tensors(self) -> dict:
        """The tensors held, by name (None where absent)."""
        return {"state": self.state, "pending": self.pending, "pending_mask": self.pending_mask}

    def map_rows(self, rows) -> "GPTBCache":
        """A new cache with `rows(tensor)` applied to every tensor along the batch (beams, repeats)."""
        held = {name: None if value is None else rows(value) for name, value in self.tensors().items()}
        if self.keys_values is not None:
            held["keys_values"] = [(rows(keys), rows(values)) for keys, values in self.keys_values]
        return GPTBCache(seq_length=self.seq_length, **held)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        reordered = self.map_rows(lambda value: value.index_select(0, beam_idx.to(value.device)))
        self.state, self.pending, self.pending_mask = reordered.state, reordered.pending, reordered.pending_mask
        self.keys_values = reordered.keys_values

    def __repr__(self):
        pending = "" if self.pending is None else f", pending={tuple(self.pending.shape)}"
        return f"GPTBCache(state={tuple(self.state.shape)}, seq_length={self.seq_length}{pending})"


# ---------------------------------------------------------------------------------------------------------------------
# GPT-2 blocks over the window (GPT-2's parameter names and Conv1D layout: weight is (in, out))


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention written out (transformers' `"eager"`), returning its weights. `attention_mask`, boolean, gives the
    keys each query may read (a segment step's mask); None: causal only when `is_causal` (`rebias=False`). Output
    `(batch, width, n_head, head_dim)`, as the attention interface expects."""
    scores = (query @ key.transpose(-2, -1)) * scaling
    if attention_mask is None and kwargs.get("is_causal", module.is_causal):
        width = query.shape[-2]
        attention_mask = torch.ones(width, width, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:  # boolean: the keys each query may read
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    output = F.dropout(weights, p=dropout, training=module.training) @ value
    return output.transpose(1, 2), weights


class GPTBAttention(nn.Module):
    def __init__(self, config: GPTBConfig):
        super().__init__()
        self.config = config  # read at each call: `model.set_attn_implementation(...)` switches it
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # rebias: the window is read both ways, so the state slots see the new token
        self.is_causal = not config.rebias

    def forward(self, x: torch.Tensor, output_attentions: bool = False, mask: torch.Tensor | None = None):
        """
        The attention output and, with `output_attentions`, its weights `(batch, n_head, width, width)`. `mask`, a
        boolean `(batch or 1, 1, width, width)` of the keys each query may read, replaces the window's own rule (a
        segment step's mask); None: bidirectional, or causal with `rebias=False`.
        """
        batch, width, dim = x.shape
        q, k, v = self._heads(x)
        # mask None: the window's own rule; padding is handled by the step (docs/design.md#padding)
        y, weights = self._attend(q, k, v, mask, self.is_causal and mask is None, output_attentions)
        y = y.reshape(batch, width, dim)
        return self.resid_dropout(self.c_proj(y)), weights if output_attentions else None

    def _attend(self, q, k, v, mask, is_causal: bool, output_attentions: bool = False):
        """The configured attention implementation (`config._attn_implementation`; eager when weights are wanted)."""
        attention = eager_attention_forward
        if self.config._attn_implementation != "eager" and not output_attentions:  # SDPA returns no weights
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        dropout = self.attn_pdrop if self.training else 0.0
        scaling = 1.0 / math.sqrt(self.head_dim)
        return attention(self, q, k, v, mask, scaling=scaling, dropout=dropout, is_causal=is_causal)

    def _heads(self, x: torch.Tensor):
        """Queries, keys and values `(batch, n_head, width, head_dim)` of the positions `x`."""
        batch, width, _ = x.shape
        qkv = self.c_attn(x).view(batch, width, 3, self.n_head, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def extend(self, x: torch.Tensor, past, mask: torch.Tensor | None = None):
        """
        Attention of new positions `x` over the keys and values `past` (a pair `(batch, n_head, n, head_dim)`, or
        None) and their own, under `mask` `(width, n + width)` (None: every key); returns the output and the keys and
        values of all `n + width` positions. A segment's decode step: the cache holds `past` (docs/design.md).
        """
        batch, width, dim = x.shape
        q, k, v = self._heads(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y, _ = self._attend(q, k, v, mask, is_causal=False)
        return self.resid_dropout(self.c_proj(y.reshape(batch, width, dim))), (k, v)


class GPTBMLP(nn.Module):
    def __init__(self, config: GPTBConfig):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = Conv1D(inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        # gelu_new is GPT-2's tanh GELU; torch's fused kernel computes the same formula in one pass instead of seven
        # elementwise ops (equal up to float rounding; the quick CPU benchmark step ran ~8% faster with it).
        activation = config.activation_function
        self.act = ACT2FN["gelu_pytorch_tanh" if activation == "gelu_new" else activation]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPTBBlock(nn.Module):
    """A GPT-2 block (pre-LayerNorm attention and MLP with residuals) over a step's window."""

    def __init__(self, config: GPTBConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPTBAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPTBMLP(config)

    def forward(self, x: torch.Tensor, output_attentions: bool = False, mask: torch.Tensor | None = None):
        attended, weights = self.attn(self.ln_1(x), output_attentions, mask)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), weights

    def extend(self, x: torch.Tensor, past, mask: torch.Tensor | None = None):
        """The block over new positions `x` that also read the keys and values `past` (see `GPTBAttention.extend`)."""
        attended, keys_values = self.attn.extend(self.ln_1(x), past, mask)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), keys_values


# ---------------------------------------------------------------------------------------------------------------------
# Models


class GPTBPreTrainedModel(PreTrainedModel):
    """Weight initialisation (GPT-2's scheme) and loading, including warm starts from GPT-2 checkpoints."""

    config_class = GPTBConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPTBBlock"]
    _skip_keys_device_placement = ["cache", "past_hidden_states"]
    _supports_sdpa = True
    _is_stateful = True
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias", r"attn\.masked_bias"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Conv1D):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
        if isinstance(module, GPTBModel):
            init.normal_(module.initial_embeds, mean=0.0, std=std)
            # Not in checkpoints (non-persistent): from_pretrained builds the model on the meta device, so the buffer
            # holds garbage until it is set here.
            positions = torch.arange(self.config.window_size, device=module.window_positions.device)
            init.copy_(module.window_positions, positions)
            # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer). Done from the body (it runs after its
            # children): transformers skips custom-code modules without parameters of their own, so a branch on
            # GPTBAttention / GPTBMLP would never run. Loaded weights are flagged and left alone by `init`.
            residual_std = std / math.sqrt(2 * self.config.n_layer)
            for block in module.h:
                init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
                init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)
        # Every variant starts as the original step (`replace`) at the defaults: s = 1, a = 0 and a zero write.
        if isinstance(module, StateUpdate):
            init.constant_(module.read_scale, self.config.state_read_scale_init)
            init.constant_(module.retain, self.config.state_retain_init)
        if isinstance(module, (GatedStateUpdate, SelectiveStateUpdate)):
            init.zeros_(module.gate.weight)
            init.constant_(module.gate.bias, self.config.state_gate_bias)
        if isinstance(module, ResidualStateUpdate):  # also the selective variant's write
            init.zeros_(module.write.weight)
            init.zeros_(module.write.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """
        Load a GPTB checkpoint, or warm-start from a GPT-2 checkpoint (folder or Hub id).

        For a GPT-2 checkpoint the config is converted ([`GPTBConfig.from_gpt2_config`]) with GPTB's own fields read
        out of `kwargs` (for example `state_size=16`); wte, wpe, every block, ln_f and lm_head load unchanged and only
        `transformer.initial_embeds` is new.
        """
        if config is None and pretrained_model_name_or_path is not None:
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
            if config_dict.get("model_type") == "gpt2":
                own_fields = set(GPTBConfig().to_dict()) - set(PretrainedConfig().to_dict())
                overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in own_fields}
                config = GPTBConfig.from_gpt2_config(config_dict, **overrides)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    # -- the Hub: save_pretrained writes a model card, the push paths upload it instead of transformers' generic one --

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        [`PreTrainedModel.save_pretrained`], plus a `README.md` model card when the folder has none (see
        [`model_card_text`]). A `README.md` already there, such as the card `gptb train` renders, is never touched.

        With `push_to_hub=True` (and `repo_id`, `commit_message`, `private`, `token`, ... as in transformers) the
        folder is saved in full first, then the files this call wrote or changed are uploaded with the folder's
        `README.md` (unless it is the card just written here and the repo already has one, as in [`push_to_hub`]).
        transformers' own path would upload before a subclass writes its extra files (the ART memory) and would write
        its generic card, or the repo's, over the folder's `README.md`.
        """
        import os

        if kwargs.pop("push_to_hub", False):
            names = ("repo_id", "private", "commit_message", "commit_description", "create_pr", "revision", "tags")
            hub = {key: kwargs.pop(key) for key in names if key in kwargs}
            is_main_process = args[0] if args else kwargs.get("is_main_process", True)
            if not is_main_process:
                return self.save_pretrained(save_directory, *args, **kwargs)
            from transformers.utils.hub import hf_api

            token = kwargs.get("token")
            repo_id = hub.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            private = hub.pop("private", None)
            repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
            card_was_there = os.path.isfile(os.path.join(save_directory, "README.md"))
            timestamps = self._get_files_timestamps(save_directory) if os.path.isdir(save_directory) else {}
            timestamps.pop("README.md", None)  # the folder's card goes up even when this call did not write it
            self.save_pretrained(save_directory, *args, repo_id=repo_id, **kwargs)  # via the subclass: its files too
            return self._push_saved_folder(
                save_directory, repo_id, timestamps, default_card=not card_was_there, token=token, **hub
            )

        card = os.path.join(save_directory, "README.md")
        card_was_there = os.path.isfile(card)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        card_text = self.model_card_text(kwargs.get("repo_id")) if is_main_process and not card_was_there else None
        if card_text is not None and os.path.isdir(save_directory):
            with open(card, "w", encoding="utf-8") as f:
                f.write(card_text)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """
        Upload the model to the Hub: what [`save_pretrained`] writes (weights, config with `auto_map`, the code files,
        `generation_config.json`, `art_memory.safetensors` when the model has an ART memory) and a model card.

        transformers' `PushToHubMixin.push_to_hub` saves to a temporary folder, then writes a generic card over the
        `README.md` there. Here the card rule is: a card the repo already has stays (with `tags` added), as in
        transformers; otherwise the card `save_pretrained` wrote is uploaded (GPTB metadata, architecture, usage with
        `trust_remote_code=True`, and this repo id), never transformers' generic one. To upload a card of your own
        (for example the one `gptb train` renders), save the folder and push it with `gptb push FOLDER REPO_ID`.
        Arguments and return value are those of `PushToHubMixin.push_to_hub` (a `CommitInfo`).
        """
        import tempfile

        from transformers.utils.hub import hf_api

        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size, repo_id=repo_id)
            return self._push_saved_folder(
                tmp_dir,
                repo_id,
                {},
                default_card=True,
                token=token,
                tags=tags,
                commit_message=commit_message,
                commit_description=commit_description,
                create_pr=create_pr,
                revision=revision,
            )

    def _push_saved_folder(self, folder, repo_id, timestamps, *, default_card, token=None, tags=None, **commit):
        """
        Upload the files of `folder` changed since `timestamps` to the existing repo `repo_id`, with `tags` (and the
        model's `model_tags`) added to the card. When the folder's `README.md` is the card `save_pretrained` has just
        written (`default_card`) and the repo already has a card, the repo's card is kept instead.
        """
        import os

        from huggingface_hub import ModelCard
        from huggingface_hub.errors import EntryNotFoundError

        card_path = os.path.join(folder, "README.md")
        card = ModelCard.load(card_path) if os.path.isfile(card_path) else None
        replaced = False
        if default_card:
            try:
                card, replaced = ModelCard.load(repo_id, token=token), True
            except EntryNotFoundError:
                pass
        tags = [*(self.model_tags or []), *([tags] if isinstance(tags, str) else tags or [])]
        if card is not None:
            new_tags = [tag for tag in dict.fromkeys(tags) if tag not in (card.data.tags or [])]
            if new_tags or replaced:
                card.data.tags = [*(card.data.tags or []), *new_tags] or None
                card.save(card_path)
        return self._upload_modified_files(folder, repo_id, timestamps, token=token, **commit)

    def model_card_text(self, repo_id: str | None = None) -> str:
        """
        The `README.md` that [`save_pretrained`] writes into a folder without one: GPTB's one model card (the template
        `gptb train` renders too), with this model's facts. Where only the remote code is at hand, without the `gptb`
        package and its template, a shorter card of the remote code's own.
        """
        try:  # absolute on purpose: the remote-code copy must not carry the package's card code with it
            from modeling_gptb.model_card import render_model_card
        except ImportError:
            return short_model_card(self, repo_id)
        return render_model_card(self, repo_id=repo_id).content


class GPTBModel(RecurrentSteps, GPTBPreTrainedModel):
    """
    The recurrent GPT-2 body: embeddings, the learned initial state `initial_embeds`, the blocks and `ln_f`, stepped
    over the sequence. Returns the last layer's output at each step's token position and the final state.
    """

    def __init__(self, config: GPTBConfig):
        super().__init__(config)
        config.check_values()
        self.state_size = config.state_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.initial_embeds = nn.Parameter(torch.zeros(config.state_size, config.n_embd))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPTBBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.state_update = build_state_update(config)
        self.register_buffer("window_positions", torch.arange(config.window_size), persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """The state before the first token, `(batch_size, state_size, n_embd)`."""
        return self.initial_embeds.unsqueeze(0).expand(batch_size, -1, -1)

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVED_IN, new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: GPTBCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        write_partial_segment: bool = True,
        output_written_states: bool = False,
        **kwargs,
    ) -> GPTBModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): tokens, read one step each.
            past_hidden_states (`torch.FloatTensor` of shape `(batch_size, state_size, n_embd)`, *optional*):
                the state to start from (a previous call's `past_hidden_states`); default `initial_embeds`.
            attention_mask (`torch.Tensor` of shape `(batch_size, length)`, *optional*): its last `sequence_length`
                columns are read; where 0, the step leaves that sequence's state unchanged.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, n_embd)`, *optional*):
                token embeddings instead of `input_ids`.
            cache ([`GPTBCache`], *optional*): `generate()`'s form of `past_hidden_states` (`past_key_values`
                before transformers 5.24).
            output_attentions (`bool`, *optional*): return each block's attention weights over the window at each
                step (computed without SDPA's fused kernel, so slower).
            token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): as in GPT-2,
                their `wte` embeddings are added to the token embeddings.
            write_partial_segment (`bool`, defaults to `True`): segment steps (`segment_length` > 1): write a last
                partial segment into `past_hidden_states`. `generate()` passes False: it continues from `cache`,
                and the write would cost the write slots at every token.
            output_written_states (`bool`, defaults to `False`): segment steps: return the state each segment
                wrote and the positions of its tokens (`written_states`, `written_positions`; the write target's
                input, docs/design.md#the-write-target).

        GPT-2's `position_ids`, `encoder_hidden_states` and `encoder_attention_mask` have no meaning here and are
        refused (`ValueError`), as is any other argument this model does not read. Every input is checked before any
        work: a bad one raises `ValueError` naming it and the value expected.
        """
        check_extra_kwargs(kwargs, type(self).__name__)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if not isinstance(write_partial_segment, bool):
            raise ValueError(f"`write_partial_segment` must be True or False, got {write_partial_segment!r}")
        if not isinstance(output_written_states, bool) or (output_written_states and self.config.segment_length == 1):
            raise ValueError(
                "`output_written_states` must be True or False, and True only with segment steps (segment_length > 1, "
                f"this model's is {self.config.segment_length}), got {output_written_states!r}"
            )
        checks = ValueChecks()
        batch, steps = self._check_tokens(input_ids, inputs_embeds, token_type_ids, checks)
        state, consumed = self._start_state(past_hidden_states, cache, batch, checks)
        step_mask = self._step_mask(attention_mask, batch, steps, self.wte.weight.device, checks)
        checks.raise_first_failure()

        token_embeds = self.wte(input_ids) if input_ids is not None else inputs_embeds
        if token_type_ids is not None:
            token_embeds = token_embeds + self.wte(token_type_ids)
        if state is None:
            state = self.initial_state(batch)
        state = state.to(device=token_embeds.device, dtype=token_embeds.dtype)

        out = self._run_call(
            state,
            token_embeds,
            step_mask,
            output_hidden_states,
            output_attentions,
            cache if isinstance(cache, GPTBCache) else None,
            write_partial_segment,
            output_written_states,
        )
        new_cache = None
        if use_cache:
            held = (out.pending, out.pending_mask, out.keys_values)
            new_cache = GPTBCache(out.cache_state, consumed + steps, *held)

        if not return_dict:
            output = (out.last_hidden_state, out.state, out.hidden_states, out.attentions)
            return tuple(v for v in output if v is not None)
        return GPTBModelOutput(
            last_hidden_state=out.last_hidden_state,
            past_hidden_states=out.state,
            cache=new_cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            written_states=out.written,
            written_positions=out.written_positions,
        )

    # -- input checks: a clear error before any work -------------------------------------------------------------

    def _check_tokens(self, input_ids, inputs_embeds, token_type_ids, checks: ValueChecks) -> tuple[int, int]:
        """Check the tokens (ids or embeddings) and their types; returns (batch_size, sequence_length)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`, got both or neither")
        vocab = self.config.vocab_size
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
                raise ValueError(
                    f"`input_ids` must be a tensor of shape (batch_size, sequence_length), got {_describe(input_ids)}"
                )
            if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
                raise ValueError(f"`input_ids` is empty (shape {tuple(input_ids.shape)}): pass at least one token")
            if input_ids.dtype not in INDEX_DTYPES:
                raise ValueError(
                    f"`input_ids` must hold integer token ids (torch.long or torch.int), got dtype {input_ids.dtype}"
                )
            check_token_ids(checks, "input_ids", input_ids, vocab)
            shape = tuple(input_ids.shape)
        else:
            expected = f"(batch_size, sequence_length, {self.config.n_embd})"
            if (
                not isinstance(inputs_embeds, torch.Tensor)
                or inputs_embeds.ndim != 3
                or inputs_embeds.shape[-1] != self.config.n_embd
            ):
                raise ValueError(f"`inputs_embeds` must have shape {expected}, got {_describe(inputs_embeds)}")
            if inputs_embeds.shape[1] == 0 or inputs_embeds.shape[0] == 0:
                raise ValueError(
                    f"`inputs_embeds` is empty (shape {tuple(inputs_embeds.shape)}): pass at least one step"
                )
            if inputs_embeds.dtype != self.wte.weight.dtype:
                raise ValueError(
                    f"`inputs_embeds` must have the model's dtype {self.wte.weight.dtype}, got {inputs_embeds.dtype}: "
                    f"pass inputs_embeds.to({self.wte.weight.dtype})"
                )
            check_finite(checks, "inputs_embeds", inputs_embeds)
            shape = tuple(inputs_embeds.shape[:2])
        if token_type_ids is not None:
            if not isinstance(token_type_ids, torch.Tensor) or tuple(token_type_ids.shape) != shape:
                raise ValueError(
                    f"`token_type_ids` must have the shape of the inputs {shape}, got {_describe(token_type_ids)}"
                )
            check_token_ids(checks, "token_type_ids", token_type_ids, vocab)
        return shape

    def _start_state(self, past_hidden_states, cache, batch, checks: ValueChecks):
        """The state to start from (None: `initial_embeds`) and the number of positions it has consumed."""
        if isinstance(cache, GPTBCache):
            if past_hidden_states is not None:
                raise ValueError("Pass the state as `past_hidden_states` or `cache`, not both")
            past_hidden_states, consumed = cache.state, cache.seq_length
        elif cache is None or (isinstance(cache, transformers.Cache) and cache.get_seq_length() == 0):
            consumed = 0  # generate()'s empty default cache carries nothing
        else:
            held = f" holding {cache.get_seq_length()} positions" if isinstance(cache, transformers.Cache) else ""
            raise ValueError(
                f"`cache` must be a GPTBCache (the state returned by this model) or None, "
                f"got {type(cache).__name__}{held}"
            )
        if past_hidden_states is None:
            return None, consumed
        expected = (batch, self.state_size, self.config.n_embd)
        if not isinstance(past_hidden_states, torch.Tensor) or tuple(past_hidden_states.shape) != expected:
            raise ValueError(
                f"`past_hidden_states` must have shape (batch_size, state_size, n_embd) = {expected}, "
                f"got {_describe(past_hidden_states)}"
            )
        if not past_hidden_states.dtype.is_floating_point:
            raise ValueError(
                f"`past_hidden_states` must be a floating-point tensor (the model's {self.wte.weight.dtype}), "
                f"got {past_hidden_states.dtype}"
            )
        # checked as the step will read it: 1e300 is finite in float64 and inf in a float32 model
        dtype = self.wte.weight.dtype
        checks.add(
            torch.isfinite(past_hidden_states.to(dtype).sum()),
            f"`past_hidden_states` holds NaN or Inf, or values beyond the model's dtype {dtype} "
            f"(magnitudes up to {torch.finfo(dtype).max:g}): pass finite values",
        )
        return past_hidden_states, consumed

    @staticmethod
    def _step_mask(attention_mask, batch, steps, device, checks: ValueChecks):
        """Boolean (batch, steps) mask of the steps that update the state, or None when there is no mask."""
        if attention_mask is None:
            return None
        if (
            not isinstance(attention_mask, torch.Tensor)
            or attention_mask.ndim != 2
            or attention_mask.shape[0] != batch
            or attention_mask.shape[1] < steps
        ):
            raise ValueError(
                f"`attention_mask` must have shape (batch_size, length) with batch_size = {batch} and "
                f"length >= sequence_length = {steps}, got {_describe(attention_mask)}"
            )
        mask = attention_mask[:, -steps:]
        check_binary_mask(checks, "attention_mask", mask)
        return mask.to(device=device, dtype=torch.bool)


def _describe(value) -> str:
    """A bad argument, as an error message names it: a tensor's shape, or the value of anything else."""
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def first_valid_tokens(input_ids: torch.Tensor, attention_mask=None, count: int = ART_EXEMPLAR_TOKENS):
    """The first `count` tokens of each sequence that the mask keeps (left or right padding), -1 past the end."""
    ids = input_ids[:, :count] if attention_mask is None else input_ids
    if attention_mask is not None:
        valid = attention_mask[:, -ids.shape[1] :].to(device=ids.device, dtype=torch.bool)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :count]  # valid positions first
        ids = torch.where(valid.gather(1, order), ids.gather(1, order), -1)
    return ids.long()


def _skipped_rows_filled(art: ARTOutput, kept: torch.Tensor) -> ARTOutput:
    """The memory's output for the `kept` rows, spread over the whole batch: category and status -1, novelty and
    similarity NaN where a row was skipped."""
    filled = []
    for values, missing in ((art.category, -1), (art.status, -1), (art.similarity, math.nan), (art.novelty, math.nan)):
        whole = values.new_full(kept.shape, missing)
        whole[kept.to(values.device)] = values
        filled.append(whole)
    return ARTOutput(*filled)


def art_memory_for(config: GPTBConfig, **placement) -> ARTMemory:
    """The empty ART memory a model of `config` holds (`config.art_enabled`); `placement`: `device`, `dtype`."""
    return ARTMemory(
        config.art_input_dim,
        rule=config.art_rule,
        vigilance=config.art_vigilance,
        beta=config.art_beta,
        alpha=config.art_alpha,
        max_categories=config.art_max_categories,
        input_transform=config.art_input_transform,
        lift=config.art_lift,
        **placement,
    )


def pool_steps(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool `hidden` (B, T, D) over the steps where `mask` (B, T) is 1: `"mean"`, `"last"` (the last valid step, step 0
    if none) or `"mean_std_max"` ([mean, population standard deviation, maximum], (B, 3D); zeros for a row without a
    valid step). docs/design.md#art-inside-gptb"""
    steps = hidden.shape[1]
    if pooling == "last":
        last = (mask * torch.arange(1, steps + 1, device=hidden.device)).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = (mask / mask.sum(dim=1, keepdim=True).clamp(min=1)).to(hidden.dtype)
    mean = torch.einsum("bt,btd->bd", weights, hidden)
    if pooling == "mean":
        return mean
    variance = torch.einsum("bt,btd->bd", weights, (hidden - mean[:, None]).square())
    positive = variance > 0
    std = torch.where(positive, variance, 1.0).sqrt() * positive  # sqrt's gradient at 0 would be inf
    valid = mask.bool()[:, :, None]
    maximum = hidden.masked_fill(~valid, float("-inf")).amax(dim=1)
    maximum = torch.where(valid.any(dim=1), maximum, 0.0)
    return torch.cat([mean, std, maximum], dim=-1)


def pool_outputs(outputs: GPTBModelOutput, attention_mask, pooling: str, pool_layers: str) -> torch.Tensor:
    """`pooling` (`art_pooling`) of each sequence over the valid steps of `pool_layers` (`art_pool_layers`: `"all"`
    reads `outputs.hidden_states`), concatenated over the layers. docs/design.md#art-inside-gptb"""
    if pooling == "state":
        return outputs.past_hidden_states.mean(dim=1)
    layers = (outputs.last_hidden_state,)
    if pool_layers == "all":
        if outputs.hidden_states is None:
            raise ValueError(
                "art_pool_layers='all' pools every layer: run the transformer with output_hidden_states=True"
            )
        layers = outputs.hidden_states
    hidden = outputs.last_hidden_state
    mask = torch.ones(hidden.shape[:2], device=hidden.device, dtype=hidden.dtype)
    if attention_mask is not None:
        mask = attention_mask[:, -hidden.shape[1] :].to(device=hidden.device, dtype=hidden.dtype)
    return torch.cat([pool_steps(layer, mask, pooling) for layer in layers], dim=-1)


class GPTBLMHeadModel(GPTBPreTrainedModel, GenerationMixin):
    """
    GPTB with GPT-2's language-modelling head (tied to `wte`). Works with `generate()` (the state is the cache, so each
    new token costs the same), `Trainer` and the original manual loop:

    ```python
    >>> logits, state = model(tokens[:, :1], past_hidden_states=None, return_dict=False)[:2]
    >>> logits, state = model(tokens[:, 1:2], past_hidden_states=state, return_dict=False)[:2]
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTBConfig):
        super().__init__(config)
        self.transformer = GPTBModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.write_probe = None  # the write target's head (docs/design.md#the-write-target)
        if config.state_write_loss > 0:
            self.write_probe = nn.Linear(config.n_embd, config.vocab_size)
        self.loss_type = "ForCausalLM"  # the class name does not say it
        self.art_memory = None
        if config.art_enabled:
            self.art_memory = art_memory_for(config)
        self.decode_graphs = DecodeGraphs()  # used when config.decode_cuda_graph
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not hand us a DynamicCache: the first step starts from `initial_embeds` (or the user's
        # state) and returns a GPTBCache, which generate() then carries.
        return False

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, past_hidden_states=None, inputs_embeds=None, **kwargs
    ):
        # `inputs_embeds` is named here so generate() knows the prompt may come as embeddings (first step only).
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, inputs_embeds=inputs_embeds, **kwargs
        )
        # A user's starting state is for the first step only; after it the returned cache carries the state.
        if past_hidden_states is not None and not isinstance(cache, GPTBCache):
            model_inputs["past_hidden_states"] = past_hidden_states
        if self.config.segment_length > 1:  # generate() reads the cache, never the written partial segment
            model_inputs["write_partial_segment"] = False
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # generate() repeats every tensor input for beams / num_return_sequences, but not a cache object: a GPTBCache
        # passed in to continue from is repeated here the same way (a new object; the caller's is left as it was).
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        cache = model_kwargs.get("cache")
        if expand_size > 1 and isinstance(cache, GPTBCache):
            model_kwargs["cache"] = cache.map_rows(lambda value: value.repeat_interleave(expand_size, dim=0))
        return input_ids, model_kwargs

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVED_IN, new_name="cache")  # before transformers' own
    def generate(self, inputs=None, generation_config=None, *args, assistant_model=None, **kwargs):
        # Refused here, not left to transformers: its own refusal changed type and wording between minor versions.
        config = generation_config if generation_config is not None else self.generation_config
        assisting = {
            "assistant_model": assistant_model,
            "prompt_lookup_num_tokens": kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens),
            "assistant_early_exit": kwargs.get("assistant_early_exit", config.assistant_early_exit),
            "use_mtp": kwargs.get("use_mtp", getattr(config, "use_mtp", None)),
        }
        used = [name for name, value in assisting.items() if value not in (None, False)]
        if used:
            raise ValueError(
                f"GPTB is a stateful (recurrent) model: assisted decoding ({', '.join(used)}) needs a cache that can "
                "be rolled back to a rejected draft token, and a recurrent state cannot be. Drop that argument."
            )
        return super().generate(inputs, generation_config, *args, **kwargs)

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVED_IN, new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: GPTBCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        art_mode: str | None = None,
        token_type_ids: torch.LongTensor | None = None,
        write_partial_segment: bool = True,
        **kwargs,
    ) -> GPTBCausalLMOutput | tuple:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): shifted inside the
                model as in `GPT2LMHeadModel`, so `labels=input_ids` works; values in `[0, vocab_size)` or `-100`
                (ignored). `num_items_in_batch` in `kwargs` (from `Trainer`) normalises the loss across
                gradient-accumulation steps.
            logits_to_keep (`int`, *optional*): compute logits for the last `logits_to_keep` steps only (0 = all);
                with `labels` it must keep every step.
            art_mode (`str`, *optional*): what the ART memory does with this batch: `"update"` (learn), `"classify"`
                (read only) or `"off"`. Default: `"update"` in training mode (or with `config.art_learn_in_eval`),
                `"off"` otherwise. Sequences without a valid step (`attention_mask` all 0) are skipped.

        Every argument is checked before any work, and the memory learns from a call only when it completes: a call
        that raises leaves the ART memory as it was. See [`GPTBModel.forward`] for the other arguments. With
        `return_dict=False` the result is the tuple `(logits, past_hidden_states, ...)`, preceded by `loss` when
        `labels` are given.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        check_extra_kwargs(kwargs, type(self).__name__)
        art_mode = self._art_mode(art_mode)
        self._check_labels(input_ids if input_ids is not None else inputs_embeds, labels, logits_to_keep)
        write_target = self.write_probe is not None and (labels is not None or self.training)
        if write_target and input_ids is None:
            raise ValueError(
                f"config.state_write_loss={self.config.state_write_loss} asks each segment's state which token ids "
                "it read: pass `input_ids`, not only `inputs_embeds` (or set state_write_loss to 0)"
            )
        if self.config.decode_cuda_graph:
            decoded = self._graph_decode_step(
                input_ids, cache, attention_mask, use_cache, return_dict, labels=labels, inputs_embeds=inputs_embeds,
                past_hidden_states=past_hidden_states, art_learns=art_mode != "off",
                output_hidden_states=output_hidden_states or self.config.output_hidden_states,
                output_attentions=output_attentions or self.config.output_attentions,
                token_type_ids=token_type_ids,
            )  # fmt: skip
            if decoded is not None:
                return decoded
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        outputs = self.transformer(
            input_ids,
            past_hidden_states=past_hidden_states,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states or (art_mode != "off" and self.pools_every_layer),
            output_attentions=output_attentions,
            token_type_ids=token_type_ids,
            write_partial_segment=write_partial_segment,
            output_written_states=write_target,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        with self._art_undone_on_error(art_mode == "update"):
            art, pooled = self._art(outputs, attention_mask, art_mode, input_ids)
            # config.loss_chunk_size: in training the loss makes the logits chunk by chunk, and returns none
            chunked_loss = labels is not None and self.training and self.config.loss_chunk_size is not None
            logits = None if chunked_loss else self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
            loss = None
            if labels is not None:
                loss = self._language_modelling_loss(logits, labels, art, hidden=hidden, **kwargs)
                if art is not None and self.config.art_loss_weight > 0:
                    loss = loss + self.config.art_loss_weight * self._art_coupling_loss(pooled, art)
            write_loss = None
            if write_target:
                write_loss = self._state_write_loss(outputs.written_states, outputs.written_positions, input_ids)
                if loss is not None and self.training:
                    loss = loss + self.config.state_write_loss * write_loss * self._share_of_items(labels, **kwargs)

        hidden_states = outputs.hidden_states if output_hidden_states else None  # not those only the pooling read
        if not return_dict:
            output = (logits, outputs.past_hidden_states)
            output += tuple(v for v in (hidden_states, outputs.attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return GPTBCausalLMOutput(
            loss=loss,
            logits=logits,
            past_hidden_states=outputs.past_hidden_states,
            cache=outputs.cache,
            hidden_states=hidden_states,
            attentions=outputs.attentions,
            art_category=None if art is None else art.category,
            art_status=None if art is None else art.status,
            art_novelty=None if art is None else art.novelty,
            state_write_loss=write_loss,
        )

    def _graph_decode_step(self, input_ids, cache, attention_mask, use_cache, return_dict, **other_inputs):
        """One-token decode step replayed from a CUDA graph (`config.decode_cuda_graph`); None: take the eager path."""
        state = cache.state if isinstance(cache, GPTBCache) else None
        if not self.decode_graphs.applies(self, input_ids, state, **other_inputs):
            return None
        decoded = self.decode_graphs.decode(self, input_ids, cache, attention_mask)
        if decoded is None:
            return None
        logits, state, cache_state, pending, pending_mask = decoded
        if not return_dict:
            return logits, state
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        new_cache = GPTBCache(cache_state, cache.seq_length + 1, pending, pending_mask) if use_cache else None
        return GPTBCausalLMOutput(logits=logits, past_hidden_states=state, cache=new_cache)

    def _check_labels(self, inputs, labels, logits_to_keep):
        """`logits_to_keep` and `labels` (shape of the inputs, ids or -100), before any work."""
        steps = inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 else None
        check_logits_to_keep(logits_to_keep, steps or 0, labels is not None)
        if labels is None or steps is None:
            return  # without usable inputs the model's own checks raise
        expected = tuple(inputs.shape[:2])
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != expected:
            raise ValueError(f"`labels` must have the shape of the inputs {expected}, got {_describe(labels)}")
        if labels.dtype != torch.long:  # what cross-entropy takes as targets
            raise ValueError(f"`labels` must be a torch.long tensor of token ids, got dtype {labels.dtype}")
        checks = ValueChecks()
        check_token_ids(checks, "labels", labels, self.config.vocab_size, ignore_index=-100)
        checks.raise_first_failure()

    # -- ART memory: pooled sequence representations, the coupled loss and the continual-learning gate --------------

    def _art_mode(self, art_mode: str | None) -> str:
        """The memory's action for this call: "update", "classify" or "off"."""
        if art_mode not in (None, "update", "classify", "off"):
            raise ValueError(f"art_mode must be 'update', 'classify' or 'off' (None: the default), got {art_mode!r}")
        if self.art_memory is None:
            if art_mode in ("update", "classify"):
                raise ValueError(f"art_mode={art_mode!r} needs an ART memory: this model has none (art_enabled=False)")
            return "off"
        if art_mode is None:
            return "update" if (self.training or self.config.art_learn_in_eval) else "off"
        return art_mode

    @contextlib.contextmanager
    def _art_undone_on_error(self, learning: bool):
        """The memory learns from a forward only when the forward completes: an error after the update undoes it."""
        if not learning:
            yield
            return
        before = [buffer.clone() for buffer in self.art_memory.buffers()]
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for buffer, saved in zip(self.art_memory.buffers(), before, strict=True):
                    buffer.copy_(saved)
            raise

    def _art(self, outputs: GPTBModelOutput, attention_mask, art_mode, input_ids=None):
        """Feed (or only classify) the pooled representation of each sequence; returns (ARTOutput, pooled). An
        update keeps each sequence's first valid tokens as the exemplar of a category it creates."""
        if art_mode == "off":
            return None, None
        pooled = self.art_input(self.pool(outputs, attention_mask))
        memory_input = pooled.detach()
        exemplars = None if input_ids is None else first_valid_tokens(input_ids, attention_mask)

        def memory_call(rows, keep=slice(None)):
            if art_mode == "classify":
                return self.art_memory.classify(rows)
            return self.art_memory.update(rows, exemplars=None if exemplars is None else exemplars[keep])

        with torch.no_grad():
            if attention_mask is None:
                return memory_call(memory_input), pooled
            # a sequence without a valid step has nothing to remember (it would pool to a constant vector)
            steps = outputs.last_hidden_state.shape[1]
            has_steps = attention_mask[:, -steps:].to(device=pooled.device, dtype=torch.bool).any(dim=1)
            if bool(has_steps.all()):
                return memory_call(memory_input), pooled
            kept = memory_call(memory_input[has_steps], has_steps.to(memory_input.device))
            return _skipped_rows_filled(kept, has_steps), pooled

    @property
    def pools_every_layer(self) -> bool:
        """Whether `pool` reads every layer's hidden states (`config.art_pool_layers="all"`): the transformer must
        then be called with `output_hidden_states=True` (the config refuses "all" with `art_pooling="state"`)."""
        return self.config.art_pool_layers == "all"

    def pool(self, outputs: GPTBModelOutput, attention_mask=None) -> torch.Tensor:
        """The `(batch_size, config.art_input_dim)` representation of each sequence: `config.art_pooling` over the
        valid steps of `config.art_pool_layers`."""
        return pool_outputs(outputs, attention_mask, self.config.art_pooling, self.config.art_pool_layers)

    @torch.no_grad()
    def art_vectors(self, input_ids, attention_mask=None) -> tuple[GPTBModelOutput, torch.Tensor]:
        """The transformer's outputs for `input_ids` and what `forward` gives the memory for each sequence
        (`art_input(pool(...))`), without touching the memory: for scoring, fitting and reports."""
        outputs = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.pools_every_layer
        )
        return outputs, self.art_input(self.pool(outputs, attention_mask))

    def art_input(self, pooled: torch.Tensor) -> torch.Tensor:
        """What the memory sees: the pooled vector for `cosine`; squashed into [0, 1] by a sigmoid for `fuzzy`."""
        return torch.sigmoid(pooled) if self.config.art_rule == "fuzzy" else pooled

    def _art_coupling_loss(self, pooled: torch.Tensor, art) -> torch.Tensor:
        """mean(1 - cos(pooled, w_category)) over sequences with a category; prototypes get no gradient."""
        has_category = art.category >= 0
        if not bool(has_category.any()):
            return pooled.sum() * 0.0
        prototypes = self.art_memory.weight[art.category.clamp(min=0)].detach().to(pooled.dtype)
        if self.config.art_rule == "fuzzy":
            pooled = torch.cat([pooled, 1.0 - pooled], dim=-1)  # complement coding, as the prototypes are stored
        distance = 1.0 - F.cosine_similarity(pooled, prototypes, dim=-1)
        return distance[has_category].mean()

    def _language_modelling_loss(self, logits, labels, art, num_items_in_batch=None, hidden=None, **kwargs):
        """
        Next-token cross-entropy; with the ART gate on, sequences that resonated count `art_resonated_weight`. Without
        `logits` (`config.loss_chunk_size`), made from `hidden` chunk by chunk.
        """
        gate = self.config.art_resonated_weight
        sequence_weights = None
        if art is not None and gate != 1.0:
            sequence_weights = torch.where(art.status.to(hidden.device) == int(ARTStatus.RESONATED), gate, 1.0)
        if logits is None:
            chunk_size = self.config.loss_chunk_size
            return chunked_causal_lm_loss(
                hidden, self.lm_head.weight, labels, chunk_size, num_items_in_batch, sequence_weights
            )
        if sequence_weights is None:
            return self.loss_function(
                logits, labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch, **kwargs
            )
        targets = labels[:, 1:].to(logits.device)
        per_token = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view_as(targets)
        total = (per_token * sequence_weights[:, None]).sum()
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        return total / torch.as_tensor(count, device=total.device).clamp(min=1)

    def _state_write_loss(self, written_states, written_positions, input_ids):
        """
        The write target (docs/design.md#the-write-target): each complete segment of this call's tokens, from the
        mean of the slots it wrote, predicts which token ids it read (multi-hot binary cross-entropy, mean over the
        vocabulary), averaged over those segments; 0 (still a function of `write_probe`) when the call has none.
        """
        batch, segments, length = written_positions.shape
        read = written_positions >= 0
        counted = read.all(dim=-1)  # (B, S): every token of the segment is one of this call's
        ids = input_ids.to(written_positions.device).gather(1, written_positions.clamp(min=0).view(batch, -1))
        targets = torch.zeros(batch, segments, self.config.vocab_size, device=ids.device)
        targets.scatter_(2, ids.view(batch, segments, length), 1.0)
        logits = self.write_probe(written_states.mean(dim=2))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision scored in float32
        targets = targets.to(logits.dtype)
        per_segment = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=-1)
        return (per_segment * counted).sum() / counted.sum().clamp(min=1)

    @staticmethod
    def _share_of_items(labels, num_items_in_batch=None, **kwargs):
        """This call's share of the scored tokens `Trainer` normalises by (`num_items_in_batch`), so a per-call term
        summed over gradient-accumulation steps weighs as their mean, as the language-modelling loss does."""
        if num_items_in_batch is None:
            return 1.0
        items = (labels[:, 1:] != -100).sum()
        return items / torch.as_tensor(num_items_in_batch, device=items.device).clamp(min=1)

    # -- the ART memory travels beside the weights as art_memory.safetensors ------------------------------------------

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if self.art_memory is not None and is_main_process:
            # The ART file names the weights it belongs to: a save killed between the two files does not load.
            weights = saved_weights_sha256(save_directory, kwargs.get("variant"))
            self.art_memory.save_pretrained(save_directory, weights_sha256=weights)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if model.art_memory is not None and any(key.startswith("art_memory.") for key in info["missing_keys"]):
            # built on the meta device and absent from the checkpoint (a GPT-2 warm start): start empty
            model.art_memory.to_empty(device=model.device)
            model.art_memory.reset()
        if model.art_memory is not None and pretrained_model_name_or_path is not None:
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}

            def locate(name):
                return cached_file(
                    pretrained_model_name_or_path,
                    name,
                    _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False,
                    **hub_kwargs,
                )

            path = locate(ART_MEMORY_FILE)
            if path is not None:
                model.art_memory.load_file(path, locate_weights=locate, weights_variant=kwargs.get("variant"))
        loaded = (model, info) if want_info else model
        return loaded


__all__ = ["GPTBCache", "GPTBLMHeadModel", "GPTBModel", "GPTBPreTrainedModel"]
