"""GPTB (with its ART memory) under the real transformers Trainer."""

import math

import pytest
import torch
from conftest import StopAfter, tiny_config
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from modeling_gptb import GPTBLMHeadModel
from modeling_gptb.callbacks import ARTReportCallback
from modeling_gptb.data import TokenBlockDataset, load_corpus
from modeling_gptb.tokenization import byte_tokenizer, token_config_kwargs


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def datasets(tokenizer):
    train = TokenBlockDataset.from_texts(load_corpus("stdlib-docs", "train", max_chars=12_000), tokenizer, 24)
    held_out = TokenBlockDataset.from_texts(load_corpus("stdlib-docs", "validation", max_chars=3_000), tokenizer, 24)
    return train, held_out


def make_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    fields = {"art_enabled": True, "art_vigilance": 0.9, **token_config_kwargs(tokenizer), **overrides}
    return GPTBLMHeadModel(tiny_config(**fields))


def make_trainer(model, tokenizer, datasets, output_dir, callbacks=None, **overrides):
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        max_steps=8,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(**values),
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=callbacks if callbacks is not None else [ARTReportCallback()],
    )


@pytest.mark.smoke
@pytest.mark.parametrize("segment_length", [1, 8], ids=["one-token", "segments"])  # blocks of 24: three segments
def test_loss_falls_and_evaluation_reports_loss_and_perplexity(tokenizer, datasets, tmp_path, segment_length):
    model = make_model(tokenizer, segment_length=segment_length)
    trainer = make_trainer(model, tokenizer, datasets, tmp_path, max_steps=30, learning_rate=5e-3)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.5
    assert math.isclose(after["eval_perplexity"], math.exp(after["eval_loss"]), rel_tol=1e-6)
    assert model.art_memory.num_categories > 0
    logged = [entry for entry in trainer.state.log_history if "art_categories" in entry]
    assert logged and logged[-1]["art_categories"] == model.art_memory.num_categories


def test_bf16_on_cpu(tokenizer, datasets, tmp_path):
    model = make_model(tokenizer)
    trainer = make_trainer(model, tokenizer, datasets, tmp_path, bf16=True, max_steps=3)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert math.isfinite(trainer.evaluate()["eval_loss"])


def one_step_weights(tokenizer, datasets, tmp_path, batch, accumulation, model_fields=None, **overrides):
    model = make_model(tokenizer, **(model_fields or {}))
    trainer = make_trainer(
        model,
        tokenizer,
        datasets,
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        **overrides,
    )
    trainer.train()
    assert model.transformer.gradient_checkpointing == overrides.get("activation_checkpointing", False)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_gradient_accumulation_equals_a_bigger_batch(tokenizer, datasets, tmp_path):
    big = one_step_weights(tokenizer, datasets, tmp_path / "big", batch=8, accumulation=1)
    accumulated = one_step_weights(tokenizer, datasets, tmp_path / "acc", batch=4, accumulation=2)
    start = make_model(tokenizer).state_dict()
    for name in big:
        assert not torch.equal(big[name], start[name]) or "initial_embeds" in name or "wpe" in name
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_from_the_trainer_argument(tokenizer, datasets, tmp_path):
    plain = one_step_weights(tokenizer, datasets, tmp_path / "plain", batch=8, accumulation=1)
    checkpointed = one_step_weights(
        tokenizer, datasets, tmp_path / "ckpt", batch=8, accumulation=1, activation_checkpointing=True
    )
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.smoke
def test_resume_gives_the_same_weights_and_memory(tokenizer, datasets, tmp_path):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, logging_steps=3)
    whole = make_model(tokenizer)
    make_trainer(whole, tokenizer, datasets, tmp_path / "whole", **settings).train()

    interrupted = make_model(tokenizer)
    callbacks = [ARTReportCallback(), StopAfter(3)]
    make_trainer(interrupted, tokenizer, datasets, tmp_path / "run", callbacks=callbacks, **settings).train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "art_memory.safetensors").is_file()

    resumed = make_model(tokenizer, seed=123)  # different initial weights and an empty memory
    trainer = make_trainer(resumed, tokenizer, datasets, tmp_path / "run", **settings)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.art_memory.num_categories == whole.art_memory.num_categories > 0
    assert torch.equal(resumed.art_memory.counts, whole.art_memory.counts)
