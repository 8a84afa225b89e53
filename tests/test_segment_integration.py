"""Segment steps (`segment_length` K > 1) through the real parts: `gptb train --set segment_length=64`, save/load, and
PEFT LoRA. (Trainer: tests/test_trainer.py, remote code in a fresh process: tests/test_hf_native.py, both parametrized
over K.)"""

import pytest
import torch
from conftest import randomize, tiny_model, train_steps
from safetensors import safe_open
from test_train_cli import fresh_accelerate_state, train  # noqa: F401 (an autouse fixture)
from transformers import AutoModelForCausalLM

from modeling_gptb import GPTBLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


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
    losses = train_steps(model, x, steps=6)
    assert losses[-1] < losses[0]
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    generated = reloaded.generate(input_ids=x[:, :3], max_new_tokens=6, do_sample=False)
    assert generated.shape == (3, 9)


def test_gptb_train_with_the_write_target(tmp_path):
    # the real Trainer under `gptb train`, with gradient accumulation (num_items_in_batch weighs the write term)
    output = tmp_path / "out"
    extra = ("--block_size", "32", "--gradient_accumulation_steps", "2")
    assert train(output, *extra, "--set", "segment_length=8", "--set", "state_write_loss=2.0") == 0
    model = GPTBLMHeadModel.from_pretrained(output)
    assert model.config.state_write_loss == 2.0 and model.write_probe is not None
    with safe_open(output / "model.safetensors", "pt") as saved:  # loaded from the file, not drawn afresh
        assert torch.equal(saved.get_tensor("write_probe.weight"), model.write_probe.weight)
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    out = model.train()(x, labels=x)
    assert torch.isfinite(out.loss) and out.state_write_loss > 0
