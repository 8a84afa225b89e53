"""Trainer callbacks: perplexity and the ART resonance report in Trainer's logs; an ART memory beside any causal LM.

    trainer = Trainer(model=gptb, ..., callbacks=[ARTReportCallback()])                    # GPTB's own memory
    trainer = Trainer(model=gpt2, ..., callbacks=[ARTMemoryCallback(ARTMemory(768))])     # stock GPT-2 + ART

Values are added to the `logs` that later callbacks (progress bar, printer) see and to `trainer.state.log_history`
(hence `trainer_state.json`). Reporting integrations such as TensorBoard run before user callbacks and so do not see
them; `gptb train` logs them to its trackers itself.
"""

import math
import os

import torch
from transformers import TrainerCallback

from .art_memory import ART_MEMORY_FILE, ARTMemory, ARTStatus


def _unwrap(model):
    while hasattr(model, "module"):  # DDP and friends
        model = model.module
    return model


def _add_to_logs(state, logs: dict, extra: dict):
    logs.update(extra)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(extra)


class ARTReportCallback(TrainerCallback):
    """
    Adds `eval_perplexity` next to `eval_loss`, and for a model with an ART memory (GPTB with `art_enabled`) the
    number of categories and the rate of new categories per sequence since the previous log.
    """

    def __init__(self):
        self._categories = 0
        self._sequences = 0

    def memory_of(self, model) -> ARTMemory | None:
        return getattr(_unwrap(model), "art_memory", None) if model is not None else None

    def sequences_seen(self, memory: ARTMemory) -> int:
        return int(memory.counts.sum()) if memory.num_categories else 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        memory = self.memory_of(model)
        if memory is not None:
            self._categories, self._sequences = memory.num_categories, self.sequences_seen(memory)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None:
            return
        extra = {}
        if "eval_loss" in logs:
            extra["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        memory = self.memory_of(model)
        if memory is not None and "loss" in logs:
            categories, sequences = memory.num_categories, self.sequences_seen(memory)
            new_sequences = sequences - self._sequences
            extra["art_categories"] = categories
            extra["art_new_category_rate"] = (categories - self._categories) / new_sequences if new_sequences else 0.0
            self._categories, self._sequences = categories, sequences
        _add_to_logs(state, logs, extra)


class ARTMemoryCallback(ARTReportCallback):
    """
    Feeds an [`ARTMemory`] beside any Hugging Face causal LM during `Trainer.train()`: the mean-pooled last hidden
    states of each training batch (valid tokens only) update the memory, without gradients. The resonance report goes
    into Trainer's logs, the memory into every checkpoint (`art_memory.safetensors`), and it comes back on
    `resume_from_checkpoint` (Trainer itself reloads only the weights).

    Under several processes every rank calls the model equally often, so `ARTMemory.update` keeps the memory identical
    on all ranks; only the main process writes files.
    """

    def __init__(self, memory: ARTMemory):
        super().__init__()
        self.memory = memory
        self.last_statuses = None
        self._hook = None

    def memory_of(self, model):
        return self.memory

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        checkpoint = args.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        saved = os.path.join(checkpoint, ART_MEMORY_FILE)
        if state.global_step > 0 and os.path.isfile(saved):
            self.memory.load_file(saved)
        super().on_train_begin(args, state, control, model=model, **kwargs)
        base = _unwrap(model).base_model
        self.memory.to(next(base.parameters()).device)
        self._hook = base.register_forward_hook(self._feed, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _feed(self, module, args, kwargs, output):
        if not module.training:
            return
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        mask = kwargs.get("attention_mask")
        if mask is None or mask.ndim != 2:
            mask = torch.ones(hidden.shape[:2], device=hidden.device)
        weights = mask.to(torch.float32)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
        with torch.no_grad():
            pooled = torch.einsum("bt,btd->bd", weights, hidden.detach().float())
            self.last_statuses = self.memory.update(pooled).status

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(checkpoint, exist_ok=True)
            self.memory.save_pretrained(checkpoint)


__all__ = ["ARTMemoryCallback", "ARTReportCallback", "ARTStatus"]
