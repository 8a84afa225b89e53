"""The README's Python examples run as written (generation lengths shortened), so an API change cannot leave them
stale."""

import re
from pathlib import Path

import torch
from conftest import tiny_model

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def block(containing: str) -> str:
    found = [b for b in BLOCKS if containing in b]
    assert len(found) == 1, f"expected one README python block containing {containing!r}, found {len(found)}"
    return found[0]


def test_load_generate_and_continue_from_the_returned_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = block("GPTBConfig(vocab_size=50257").replace("max_new_tokens=500,", "max_new_tokens=12,")
    namespace = {}
    exec(code, namespace)
    first, more = namespace["first"], namespace["more"]
    assert namespace["out"].shape == (1, 3 + 12) and namespace["beams"].shape[0] == 2
    assert first.cache.get_seq_length() == first.sequences.shape[1] - 1  # the last token is not consumed yet
    assert more.shape[1] == first.sequences.shape[1] + 1 + 10


def test_the_manual_loop():
    model = tiny_model().train()
    tokens = torch.randint(0, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    namespace = {"torch": torch, "model": model, "tokens": tokens}
    exec(block("past_hidden_states=state"), namespace)
    assert namespace["state"].shape == (2, model.config.state_size, model.config.n_embd)
    assert not namespace["state"].requires_grad
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_the_art_memory_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generator = torch.Generator().manual_seed(0)
    namespace = {
        "hidden": torch.randn(40, 768, generator=generator),
        "other": torch.randn(5, 768, generator=generator),
    }
    exec(block("ARTMemory(768"), namespace)
    assert len(namespace["out"]) == 40
    assert (tmp_path / "folder" / "art_memory.safetensors").is_file()
    assert namespace["memory"].num_categories == namespace["out"].status_names().count("new")
