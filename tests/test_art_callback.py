"""ARTMemory beside a stock GPT2LMHeadModel through ARTMemoryCallback: fed, logged, checkpointed, resumed."""

import torch
from conftest import StopAfter
from transformers import (
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from modeling_gptb.art_memory import ARTMemory
from modeling_gptb.callbacks import ARTMemoryCallback
from modeling_gptb.data import TokenBlockDataset, load_corpus
from modeling_gptb.tokenization import byte_tokenizer


def gpt2(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def run(model, memory, tokenizer, dataset, output_dir, stop_after=None, resume=None):
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=6,
        logging_steps=2,
        save_strategy="steps",
        save_steps=3,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    callback = ARTMemoryCallback(memory)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback] + ([StopAfter(stop_after)] if stop_after else []),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def test_callback_feeds_logs_checkpoints_and_resumes(tmp_path):
    tokenizer = byte_tokenizer()
    dataset = TokenBlockDataset.from_texts(load_corpus("stdlib-docs", "train", max_chars=8_000), tokenizer, 16)

    # What the memory must hold: mean-pooled last hidden states of each training batch, in order.
    whole_memory = ARTMemory(32, vigilance=0.97)
    model = gpt2(tokenizer)
    trainer, callback = run(model, whole_memory, tokenizer, dataset, tmp_path / "whole")
    assert whole_memory.num_categories > 0 and int(whole_memory.counts.sum()) == 6 * 4
    logs = [entry for entry in trainer.state.log_history if "art_categories" in entry]
    assert len(logs) == 3 and logs[-1]["art_categories"] == whole_memory.num_categories
    assert all(0.0 <= entry["art_new_category_rate"] <= 1.0 for entry in logs)
    for step in (3, 6):
        saved = ARTMemory.from_pretrained(str(tmp_path / "whole" / f"checkpoint-{step}"))
        assert saved.num_categories > 0
    final = ARTMemory.from_pretrained(str(tmp_path / "whole" / "checkpoint-6"))
    assert torch.equal(final.prototypes, whole_memory.prototypes)
    assert callback._hook is None  # the forward hook is gone after training

    # Stop after checkpoint 3, resume into a fresh memory: same memory as the uninterrupted run.
    run(gpt2(tokenizer), ARTMemory(32, vigilance=0.97), tokenizer, dataset, tmp_path / "run", stop_after=3)
    resumed_memory = ARTMemory(32, vigilance=0.97)
    checkpoint = str(tmp_path / "run" / "checkpoint-3")
    run(gpt2(tokenizer, seed=5), resumed_memory, tokenizer, dataset, tmp_path / "run", resume=checkpoint)
    assert resumed_memory.num_categories == whole_memory.num_categories
    assert torch.equal(resumed_memory.counts, whole_memory.counts)
    torch.testing.assert_close(resumed_memory.prototypes, whole_memory.prototypes, rtol=1e-5, atol=1e-6)


def test_eval_batches_do_not_feed_the_memory(tmp_path):
    tokenizer = byte_tokenizer()
    dataset = TokenBlockDataset.from_texts(load_corpus("stdlib-docs", "train", max_chars=4_000), tokenizer, 16)
    memory = ARTMemory(32, vigilance=0.97)
    trainer, _ = run(gpt2(tokenizer), memory, tokenizer, dataset, tmp_path, stop_after=2)
    seen = int(memory.counts.sum())
    trainer.evaluate(dataset)
    assert int(memory.counts.sum()) == seen
