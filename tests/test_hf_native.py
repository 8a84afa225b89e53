"""GPTB as a transformers model (issue 2 items 8, 9, 10): Auto classes, remote code, offline Hub ids, GPT-2 warm
start, dtype / attention / device-map loading, tied and resized embeddings, initialisation, docstrings."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import WITHOUT_THE_PACKAGE, randomize, tiny_config, tiny_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
)

import modeling_gptb
from modeling_gptb import GPTBCache, GPTBConfig, GPTBLMHeadModel, GPTBModel, GPTBPreTrainedModel

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(modeling_gptb.__file__).resolve().parent
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENS = torch.tensor([[5, 17, 3, 42, 8, 60, 1], [9, 9, 2, 33, 14, 7, 0]])


def remote_code_files():
    """The files `save_pretrained` must copy: the config and modeling files and every file they reach by
    `from .name import ...`, directly or through each other (the input checks, the ART memory's rules, engine and
    file format, the CUDA-graph decoding, the chunked loss)."""
    files, to_read = set(), ["configuration_gptb.py", "modeling_gptb.py"]
    while to_read:
        name = to_read.pop()
        if name not in files:
            files.add(name)
            source = (PACKAGE_DIR / name).read_text()
            to_read += [f"{module}.py" for module in re.findall(r"^from \.(\w+) import", source, re.MULTILINE)]
    return files


def populate_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay `folder` out as the local HF cache holds a downloaded repo: refs/main names a commit, whose snapshot has the
    files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    return repo


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Point huggingface_hub at an empty cache in offline mode (read at call time, so this works in-process)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def saved_model(tmp_path, request):
    # a test may ask for segment steps with @pytest.mark.parametrize("saved_model", [K], indirect=True)
    segment_length = getattr(request, "param", 1)
    model = randomize(tiny_model(art_enabled=True, art_vigilance=0.99, segment_length=segment_length), seed=3)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 60, (6, 5), generator=torch.Generator().manual_seed(3)))  # the memory learns
    model.eval()
    assert model.art_memory.num_categories > 1
    folder = tmp_path / "gptb-tiny"
    model.save_pretrained(folder)
    return model, folder


def small_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Auto classes, save_pretrained, remote code


def test_auto_classes_resolve_gptb_after_import():
    values = {key: value for key, value in tiny_config().to_dict().items() if key != "model_type"}
    config = AutoConfig.for_model("gptb", **values)
    assert type(config) is GPTBConfig
    assert type(AutoModel.from_config(config)) is GPTBModel
    assert type(AutoModelForCausalLM.from_config(config)) is GPTBLMHeadModel


def test_auto_classes_load_a_saved_folder(saved_model):
    model, folder = saved_model
    assert type(AutoConfig.from_pretrained(folder)) is GPTBConfig
    base = AutoModel.from_pretrained(folder)
    assert type(base) is GPTBModel
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is GPTBLMHeadModel
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
        assert torch.equal(base(TOKENS).last_hidden_state, model.transformer(TOKENS).last_hidden_state)


def test_save_pretrained_writes_auto_map_and_copies_the_code(saved_model):
    _, folder = saved_model
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gptb"
    auto_map = config["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_gptb.GPTBConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_gptb.GPTBLMHeadModel"
    assert auto_map.get("AutoModel", "modeling_gptb.GPTBModel") == "modeling_gptb.GPTBModel"
    copied = {path.name for path in folder.glob("*.py")}
    assert copied == remote_code_files()
    for name in copied:
        assert (folder / name).read_text() == (PACKAGE_DIR / name).read_text()


SUBPROCESS_SCRIPT = WITHOUT_THE_PACKAGE + textwrap.dedent(
    """
    folder, repo_id, work = sys.argv[2], sys.argv[3], sys.argv[4]

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    tokens = torch.load(os.path.join(work, "tokens.pt"))
    results = {}
    for key, source in (("folder", folder), ("repo_id", repo_id)):
        config = AutoConfig.from_pretrained(source, trust_remote_code=True)
        assert type(config).__name__ == "GPTBConfig", type(config)
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
        module = type(model).__module__
        assert type(model).__name__ == "GPTBLMHeadModel" and module.startswith("transformers_modules."), module
        with torch.no_grad():
            results[key] = model(tokens).logits
        results[key + "_generate"] = model.generate(tokens[:, :4], max_new_tokens=6, do_sample=False)
        results[key + "_art"] = (model.art_memory.prototypes, model.art_memory.counts)
    assert not any(name == "modeling_gptb" or name.startswith("modeling_gptb.") for name in sys.modules)
    torch.save(results, os.path.join(work, "results.pt"))
    print("OK")
    """
)


@pytest.mark.smoke
@pytest.mark.parametrize("saved_model", [1, 3], indirect=True, ids=["one-token", "segments"])
def test_remote_code_in_a_fresh_process_without_the_package(saved_model, tmp_path):
    model, folder = saved_model
    work = tmp_path / "work"
    work.mkdir()
    torch.save(TOKENS, work / "tokens.pt")
    (work / "check_remote.py").write_text(SUBPROCESS_SCRIPT)
    cache = tmp_path / "hub-cache"
    populate_hub_cache(cache, "someone/gptb-tiny", folder)

    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_MODULES_CACHE=str(tmp_path / "hf-modules"),
        HF_HUB_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        PYTHONNOUSERSITE="1",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "check_remote.py", str(REPO_ROOT), str(folder), "someone/gptb-tiny", str(work)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
    results = torch.load(work / "results.pt")
    with torch.no_grad():
        expected = model(TOKENS).logits
    assert torch.equal(results["folder"], expected)
    assert torch.equal(results["repo_id"], expected)
    expected_tokens = model.generate(TOKENS[:, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(results["folder_generate"], expected_tokens)
    assert torch.equal(results["repo_id_generate"], expected_tokens)
    for key in ("folder_art", "repo_id_art"):  # the ART memory came along, bit for bit
        assert torch.equal(results[key][0], model.art_memory.prototypes)
        assert torch.equal(results[key][1], model.art_memory.counts)
    # the code that ran is the code that was saved
    module_files = {path.name for path in (tmp_path / "hf-modules").rglob("*.py") if path.name != "__init__.py"}
    assert remote_code_files() <= module_files


def test_load_by_repo_id_from_offline_cache_in_process(saved_model, offline_hub):
    model, folder = saved_model
    populate_hub_cache(offline_hub, "someone/gptb-tiny", folder)
    with torch.no_grad():
        expected = model(TOKENS).logits
        for loader in (GPTBLMHeadModel, AutoModelForCausalLM):
            loaded = loader.from_pretrained("someone/gptb-tiny")
            assert type(loaded) is GPTBLMHeadModel
            assert torch.equal(loaded(TOKENS).logits, expected)
            assert torch.equal(loaded.art_memory.prototypes, model.art_memory.prototypes)
            assert torch.equal(loaded.art_memory.counts, model.art_memory.counts)
    with pytest.raises(OSError):  # offline really is offline: an id not in the cache is not fetched
        GPTBLMHeadModel.from_pretrained("someone/not-in-the-cache")


# ---------------------------------------------------------------------------------------------------------------------
# GPT-2 warm start


def assert_warm_started_from(gptb, gpt2, state_size):
    assert gptb.config.model_type == "gptb" and type(gptb.config) is GPTBConfig
    assert gptb.config.state_size == state_size
    for field in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "layer_norm_epsilon"):
        assert getattr(gptb.config, field) == getattr(gpt2.config, field), field
    gpt2_params = dict(gpt2.named_parameters(remove_duplicate=False))
    gptb_params = dict(gptb.named_parameters(remove_duplicate=False))
    assert set(gptb_params) - set(gpt2_params) == {"transformer.initial_embeds"}
    for name, param in gpt2_params.items():
        assert torch.equal(gptb_params[name], param), name
    assert torch.equal(gptb.lm_head.weight, gpt2.lm_head.weight)
    initial = gptb.transformer.initial_embeds
    assert initial.shape == (state_size, gpt2.config.n_embd)
    assert initial.abs().sum() > 0  # initialised, not left at zero


def test_gpt2_warm_start_from_a_folder(tmp_path):
    gpt2 = small_gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2-small-random")
    gptb, info = GPTBLMHeadModel.from_pretrained(
        tmp_path / "gpt2-small-random", state_size=5, output_loading_info=True
    )
    assert_warm_started_from(gptb, gpt2, 5)
    assert set(info["missing_keys"]) == {"transformer.initial_embeds"}  # everything else came from GPT-2
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    # the converted model saves and reloads as a GPTB checkpoint
    gptb.save_pretrained(tmp_path / "converted")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert type(reloaded) is GPTBLMHeadModel and reloaded.config.state_size == 5
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, gptb(TOKENS).logits)


def test_gpt2_warm_start_of_the_base_model(tmp_path):
    gpt2 = small_gpt2(seed=3)
    gpt2.save_pretrained(tmp_path / "gpt2-lm")
    body, info = GPTBModel.from_pretrained(tmp_path / "gpt2-lm", state_size=3, output_loading_info=True)
    assert body.config.state_size == 3 and set(info["missing_keys"]) == {"initial_embeds"}
    for name, param in gpt2.transformer.named_parameters():
        assert torch.equal(body.get_parameter(name), param), name


def test_gpt2_warm_start_by_repo_id_from_offline_cache(tmp_path, offline_hub):
    gpt2 = small_gpt2(seed=1)
    gpt2.save_pretrained(tmp_path / "gpt2-folder")
    populate_hub_cache(offline_hub, "someone/gpt2-random", tmp_path / "gpt2-folder")
    gptb = GPTBLMHeadModel.from_pretrained("someone/gpt2-random", state_size=4, rebias=False)
    assert_warm_started_from(gptb, gpt2, 4)
    assert gptb.config.rebias is False


def test_gpt2_warm_start_causal_steps_equal_gpt2model_over_the_window(tmp_path):
    """rebias=False: each step is GPT2Model (someone else's code) over [state, wte(x)] at positions 0..M."""
    gpt2 = small_gpt2(seed=2)
    with torch.no_grad():  # sharper weights than GPT-2's init so a wrong position or mask shows
        for name, param in gpt2.named_parameters():
            if "ln_" not in name:
                param.mul_(10.0)
    gpt2.save_pretrained(tmp_path / "gpt2")
    M = 5
    gptb = GPTBLMHeadModel.from_pretrained(tmp_path / "gpt2", state_size=M, rebias=False).eval()
    body = GPT2Model.from_pretrained(tmp_path / "gpt2", attn_implementation="eager").eval()
    tokens = TOKENS[:, :3]
    with torch.no_grad():
        out = gptb(tokens)
        state = gptb.transformer.initial_embeds.expand(2, M, 32)
        wte = body.wte.weight
        for t in range(3):
            window = torch.cat([state, wte[tokens[:, t]][:, None]], dim=1)
            hidden = body(inputs_embeds=window, position_ids=torch.arange(M + 1)[None]).last_hidden_state
            logits = hidden[:, M] @ gpt2.lm_head.weight.T
            torch.testing.assert_close(out.logits[:, t], logits, rtol=1e-5, atol=1e-5)
            state = hidden[:, :M]
        torch.testing.assert_close(out.past_hidden_states, state, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# dtype, attention implementation, device map


def test_bfloat16_loading(tmp_path):
    model = randomize(tiny_model(), seed=6, scale=0.1)
    folder = tmp_path / "gptb-bf16"
    model.save_pretrained(folder)
    half = GPTBLMHeadModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert all(param.dtype == torch.bfloat16 for param in half.parameters())
    with torch.no_grad():
        out = half(TOKENS)
        expected = model(TOKENS).logits
    assert out.logits.dtype == torch.bfloat16 and out.past_hidden_states.dtype == torch.bfloat16
    scale = expected.abs().max()
    torch.testing.assert_close(out.logits.float(), expected, rtol=0.03, atol=0.03 * float(scale))
    generated = half.generate(TOKENS[:, :3], max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 7)
    auto = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert auto.dtype == torch.bfloat16


def test_sdpa_attention_implementation_is_accepted(saved_model):
    model, folder = saved_model
    sdpa = GPTBLMHeadModel.from_pretrained(folder, attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    from_config = GPTBLMHeadModel._from_config(tiny_config(), attn_implementation="sdpa")
    assert from_config.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(sdpa(TOKENS).logits, model(TOKENS).logits)


@pytest.mark.parametrize("rebias", [True, False])
def test_sdpa_is_causal_follows_rebias(monkeypatch, rebias):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    model = tiny_model(rebias=rebias)
    with torch.no_grad():
        model(TOKENS[:, :2])
    assert len(calls) == 2 * model.config.n_layer  # two steps, every layer through SDPA
    assert all(is_causal is (not rebias) and mask is None for is_causal, mask in calls)


@pytest.mark.smoke
@pytest.mark.parametrize("rebias", [True, False])
def test_set_attn_implementation_switches_to_eager_with_the_same_outputs(monkeypatch, rebias):
    # Issue 20 item 6: set_attn_implementation("eager") warned and kept SDPA. Now the switch takes effect at once, in
    # both directions, and eager attention equals SDPA (also from_pretrained(..., attn_implementation="eager")).
    import modeling_gptb.modeling_gptb as module

    calls = {"eager": 0, "sdpa": 0}
    eager, sdpa = module.eager_attention_forward, torch.nn.functional.scaled_dot_product_attention

    def counting(name, function):
        def run(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(module, "eager_attention_forward", counting("eager", eager))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting("sdpa", sdpa))
    model = randomize(tiny_model(rebias=rebias), seed=5).double()  # float64: the two differ only in rounding
    with torch.no_grad():
        expected = model(TOKENS).logits
        assert calls == {"eager": 0, "sdpa": TOKENS.shape[1] * model.config.n_layer}
        model.set_attn_implementation("eager")
        assert (
            model.config._attn_implementation == "eager" and model.transformer.config._attn_implementation == "eager"
        )
        eager_logits = model(TOKENS).logits
        assert calls["eager"] == TOKENS.shape[1] * model.config.n_layer and calls["sdpa"] == calls["eager"]
        torch.testing.assert_close(eager_logits, expected, rtol=1e-10, atol=1e-10)
        model.set_attn_implementation("sdpa")
        assert torch.equal(model(TOKENS).logits, expected)


def test_eager_attention_from_pretrained(saved_model):
    _, folder = saved_model
    eager = GPTBLMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float64)
    sdpa = GPTBLMHeadModel.from_pretrained(folder, dtype=torch.float64)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(TOKENS).logits, sdpa(TOKENS).logits, rtol=1e-10, atol=1e-10)


def test_device_map_auto_loads_on_cpu(saved_model):
    import accelerate  # noqa: F401  (a requirement of the package; device_map needs it)

    model, folder = saved_model
    assert GPTBPreTrainedModel._no_split_modules == ["GPTBBlock"]
    mapped = AutoModelForCausalLM.from_pretrained(folder, device_map="auto")
    assert all(param.device.type == "cpu" for param in mapped.parameters())
    with torch.no_grad():
        assert torch.equal(mapped(TOKENS).logits, model(TOKENS).logits)
    assert torch.equal(
        mapped.generate(TOKENS[:, :3], max_new_tokens=5, do_sample=False),
        model.generate(TOKENS[:, :3], max_new_tokens=5, do_sample=False),
    )


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")
def test_device_map_with_a_block_offloaded_to_disk(saved_model, tmp_path):
    """accelerate's hooks move the inputs of an offloaded block; the GPTBCache passes them by untouched."""
    model, folder = saved_model
    device_map = {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.initial_embeds": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
        "art_memory": "cpu",  # the memory's buffers are placed like any module's
    }
    mapped = GPTBLMHeadModel.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "offload")
    assert mapped.hf_device_map["transformer.h.1"] == "disk"
    with torch.no_grad():
        assert torch.equal(mapped(TOKENS).logits, model(TOKENS).logits)
    for kwargs in (dict(), dict(num_beams=3, num_return_sequences=2)):
        expected = model.generate(TOKENS[:, :3], max_new_tokens=5, do_sample=False, **kwargs)
        assert torch.equal(mapped.generate(TOKENS[:, :3], max_new_tokens=5, do_sample=False, **kwargs), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings, initialisation, docstrings


def test_tied_embeddings_survive_save_and_load(saved_model):
    model, folder = saved_model
    assert model.lm_head.weight is model.transformer.wte.weight
    loaded = GPTBLMHeadModel.from_pretrained(folder)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_untied_embeddings_stay_apart(tmp_path):
    model = randomize(tiny_model(tie_word_embeddings=False), seed=4)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    model.save_pretrained(tmp_path / "untied")
    loaded = GPTBLMHeadModel.from_pretrained(tmp_path / "untied")
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)


def test_resize_token_embeddings():
    model = randomize(tiny_model(), seed=5)
    old = model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        before = model(TOKENS).logits
    model.resize_token_embeddings(70)
    assert model.config.vocab_size == 70
    assert model.transformer.wte.weight.shape == (70, 32)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight[:61], old)
    with torch.no_grad():
        after = model(TOKENS).logits
        assert after.shape == (2, 7, 70)
        torch.testing.assert_close(after[..., :61], before)  # old ids, old logits
        new_ids = model(torch.tensor([[65, 69, 61]]))
    assert new_ids.logits.shape == (1, 3, 70)
    with pytest.raises(ValueError, match="70"):
        model(torch.tensor([[70]]))
    generated = model.generate(torch.tensor([[69, 62]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 5)


def test_post_init_initialises_like_gpt2():
    torch.manual_seed(0)
    config = tiny_config(n_embd=64, n_layer=4, initializer_range=0.02)
    model = GPTBLMHeadModel(config)
    std = config.initializer_range
    params = dict(model.named_parameters())
    for name, param in params.items():
        if "ln_" in name and name.endswith("weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            assert param.abs().sum() > 0, f"{name} left at zero"
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"):
        assert abs(params[name].std().item() - std) < 0.1 * std, name
    scaled = std / (2 * config.n_layer) ** 0.5
    for name in ("transformer.h.1.attn.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"):
        assert abs(params[name].std().item() - scaled) < 0.1 * scaled, name
    assert params["transformer.initial_embeds"].std().item() > 0.5 * std


def test_public_classes_have_docstrings():
    for cls in (GPTBConfig, GPTBPreTrainedModel, GPTBModel, GPTBLMHeadModel, GPTBCache):
        assert cls.__doc__ and len(cls.__doc__.strip()) > 40, cls.__name__
    for method in (GPTBModel.forward, GPTBLMHeadModel.forward):
        assert method.__doc__ and "past_hidden_states" in method.__doc__
    assert modeling_gptb.__doc__
