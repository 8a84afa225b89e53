"""LoRA on GPTB with peft (issue 12 item 10): GPTB keeps GPT-2's fused Conv1D `c_attn`, so LoRA targets it with
`fan_in_fan_out=True`, as for GPT-2. Train, save the adapter, reload it equal, merge; and `get_peft_model` with
`task_type="CAUSAL_LM"` through the real Trainer and `generate`. Needs the `[peft]` extra (CI installs it)."""

import re
from pathlib import Path

import pytest
import torch
from conftest import randomize, tiny_model, train_steps
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from modeling_gptb import GPTBLMHeadModel
from modeling_gptb.data import TokenBlockDataset, load_corpus
from modeling_gptb.tokenization import byte_tokenizer

peft = pytest.importorskip("peft", reason="the [peft] extra is not installed (pip install -e '.[peft]')")

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = torch.randint(2, 258, (3, 9), generator=torch.Generator().manual_seed(1))


def base_model() -> GPTBLMHeadModel:
    """The same tiny byte-level GPTB every call (fixed seed), with weights large enough to give varied logits."""
    return randomize(tiny_model(seed=2, vocab_size=258, pad_token_id=1), seed=2, scale=0.2)


def lora_config(**extra):
    # GPTB's c_attn is GPT-2's Conv1D (weight stored in x out): fan_in_fan_out=True, as peft wants for GPT-2
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, **extra)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def test_lora_trains_saves_reloads_equal_and_merges(tmp_path):
    model = peft.get_peft_model(base_model(), lora_config())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and ".attn.c_attn." in name for name in trainable)

    model.train()
    losses = train_steps(model, TOKENS, steps=8)
    assert losses[-1] < losses[0]
    model.eval()
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(base_model()))  # the adapter changed the model

    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    reloaded = peft.PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    assert torch.equal(logits(reloaded), adapted)

    merged = reloaded.merge_and_unload()
    assert type(merged) is GPTBLMHeadModel
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)


def test_get_peft_model_causal_lm_through_trainer_and_generate(tmp_path):
    tokenizer = byte_tokenizer()
    dataset = TokenBlockDataset.from_texts(load_corpus("stdlib-docs", "train", max_chars=4_000), tokenizer, 16)
    model = peft.get_peft_model(base_model(), lora_config(task_type="CAUSAL_LM"))
    assert isinstance(model, peft.PeftModelForCausalLM)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            max_steps=3,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        ),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    assert trainer.train().global_step == 3
    changed = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert changed and len(changed) == len(before)

    model.eval()
    prompt = tokenizer(["Return the", "A list"], return_tensors="pt", padding=True)
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (2, prompt.input_ids.shape[1] + 6)
    merged = model.merge_and_unload()
    expected = merged.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(generated, expected)


def test_the_readme_lora_example(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "LoraConfig(" in block]
    monkeypatch.chdir(tmp_path)
    namespace = {"model": base_model()}
    exec(code, namespace)
    assert type(namespace["merged"]) is GPTBLMHeadModel
    assert (tmp_path / "gptb-lora" / "adapter_model.safetensors").is_file()
    reloaded = peft.PeftModel.from_pretrained(base_model(), tmp_path / "gptb-lora").eval()
    torch.testing.assert_close(logits(reloaded), logits(namespace["merged"].eval()), rtol=1e-5, atol=1e-5)
