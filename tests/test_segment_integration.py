"""Segment steps (`segment_length` K > 1) through the real parts: Trainer, `gptb train --set segment_length=64`,
save/load, and PEFT LoRA. (Remote code in a fresh process: tests/test_hf_native.py, parametrized over K.)"""

import math

import pytest
import torch
from conftest import randomize, tiny_model
from test_train_cli import fresh_accelerate_state, train  # noqa: F401 (an autouse fixture)
from test_trainer import datasets, make_model, make_trainer, tokenizer  # noqa: F401 (fixtures)
from transformers import AutoModelForCausalLM

from modeling_gptb import GPTBLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trainer_learns_with_segments(tokenizer, datasets, tmp_path):  # noqa: F811
    # blocks of 24 tokens: three segments of 8 per sequence
    model = make_model(tokenizer, segment_length=8)
    trainer = make_trainer(model, tokenizer, datasets, tmp_path, max_steps=30, learning_rate=5e-3)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.5
    assert math.isclose(after["eval_perplexity"], math.exp(after["eval_loss"]), rel_tol=1e-6)


def test_gptb_train_with_segment_length_64(tmp_path):
    output = tmp_path / "out"
    assert train(output, "--block_size", "96", "--set", "segment_length=64") == 0  # a full and a partial segment
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    assert type(model) is GPTBLMHeadModel and model.config.segment_length == 64
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    forced = model(out.sequences[:, :-1]).logits[:, 2:]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), forced, rtol=1e-5, atol=1e-5)


def test_save_and_load_keep_segment_steps(tmp_path):
    model = randomize(tiny_model(segment_length=5, state_update="selective"), seed=2)
    x = torch.randint(0, 60, (2, 13), generator=torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path)
    loaded = GPTBLMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config.segment_length == 5
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_lora_on_segment_steps_trains_and_reloads_equal(tmp_path):
    peft = pytest.importorskip("peft", reason="the [peft] extra is not installed (pip install -e '.[peft]')")

    def base():
        return randomize(tiny_model(seed=2, segment_length=4), seed=2, scale=0.2)

    x = torch.randint(0, 60, (3, 10), generator=torch.Generator().manual_seed(1))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(base(), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    generated = reloaded.generate(input_ids=x[:, :3], max_new_tokens=6, do_sample=False)
    assert generated.shape == (3, 9)
