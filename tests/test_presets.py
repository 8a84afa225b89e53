"""Presets in configuration/: model configs, recipes, Accelerate configs; loading by name or path; clear errors."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from modeling_gptb import presets
from modeling_gptb.presets import (
    accelerate_config_path,
    data_dir,
    list_presets,
    load_model_preset,
    load_recipe,
)

REPO = Path(__file__).resolve().parents[1]


def test_data_dir_is_the_checkout_folder():
    assert data_dir("configuration") == REPO / "configuration"
    assert data_dir("hub_cards") == REPO / "hub_cards"
    with pytest.raises(ValueError, match="unknown data folder 'models'"):
        data_dir("models")


@pytest.mark.parametrize("with_init", [False, True], ids=["namespace-package", "regular-package"])
def test_data_dir_falls_back_to_the_installed_package(tmp_path, monkeypatch, with_init):
    """Installed from a wheel, the folders are packages gptb_configuration / gptb_hub_cards (setup.cfg)."""
    installed = tmp_path / "site" / "gptb_configuration"
    (installed / "models").mkdir(parents=True)
    (installed / "models" / "only-here.json").write_text('{"n_layer": 1}')
    if with_init:
        (installed / "__init__.py").write_text("")
    monkeypatch.setattr(presets, "__file__", str(tmp_path / "elsewhere" / "modeling_gptb" / "presets.py"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    # as from a wheel: hide the finders of an editable install (`pip install -e .`), which map the checkout
    wheel_like = [finder for finder in sys.meta_path if "editable" not in type(finder).__module__.lower()]
    monkeypatch.setattr(sys, "meta_path", wheel_like)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if "__editable__" not in entry])
    monkeypatch.delitem(sys.modules, "gptb_configuration", raising=False)
    importlib.invalidate_caches()
    try:
        assert data_dir("configuration") == installed
        assert list_presets("models") == ["only-here"]
        assert load_model_preset("only-here") == {"n_layer": 1}
        with pytest.raises(FileNotFoundError, match="'hub_cards' data folder is missing.*reinstall gptb"):
            data_dir("hub_cards")
    finally:
        sys.modules.pop("gptb_configuration", None)  # imported from tmp_path: must not outlive the test


def test_list_presets():
    assert list_presets("models") == ["gptb-small", "gptb-tiny"]
    assert list_presets("accelerate") == ["cpu-2proc", "cpu-single", "gpu-multi", "gpu-single-bf16"]
    assert "tiny-cpu" in list_presets("recipes")
    with pytest.raises(ValueError, match="unknown preset kind 'model'; expected one of models, recipes, accelerate"):
        list_presets("model")


# ---------------------------------------------------------------------------------------------------------------
# Model presets


@pytest.mark.parametrize("name", ["gptb-tiny", "gptb-small"])
def test_model_presets_are_gptb_config_fields(name):
    from modeling_gptb.configuration_gptb import GPTBConfig

    values = load_model_preset(name)
    config = GPTBConfig(**values)
    known = set(GPTBConfig().to_dict())
    assert set(values) <= known, f"not GPTBConfig fields (typos?): {sorted(set(values) - known)}"
    for key, value in values.items():
        assert getattr(config, key) == value


def test_model_preset_values():
    tiny, small = load_model_preset("gptb-tiny"), load_model_preset("gptb-small")
    assert (tiny["n_embd"], tiny["n_layer"], tiny["n_head"], tiny["state_size"]) == (128, 2, 4, 8)
    assert tiny["art_enabled"] and tiny["art_rule"] == "cosine" and tiny["art_pooling"] == "mean"
    # GPT-2 small's dimensions and vocabulary, so GPT-2 weights warm-start it.
    gpt2_small = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None, "vocab_size": 50257}
    assert {key: small[key] for key in gpt2_small} == gpt2_small
    assert small["activation_function"] == "gelu_new" and small["layer_norm_epsilon"] == 1e-5


def test_tiny_preset_token_ids_match_our_tokenizers():
    from modeling_gptb.tokenization import byte_tokenizer, token_config_kwargs

    tiny = load_model_preset("gptb-tiny")
    ids = token_config_kwargs(byte_tokenizer())
    assert {key: tiny[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        key: ids[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
    }


def test_load_by_path_and_by_name_with_suffix(tmp_path):
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"_comment": "a note", "n_layer": 3}))
    assert load_model_preset(custom) == {"n_layer": 3}
    assert load_model_preset(str(custom)) == {"n_layer": 3}
    assert load_model_preset("gptb-tiny.json") == load_model_preset("gptb-tiny")


def test_unknown_preset_lists_the_ones_that_exist():
    with pytest.raises(ValueError) as info:
        load_model_preset("gptb-huge")
    assert str(info.value) == (
        "unknown model preset 'gptb-huge'; available: gptb-small, gptb-tiny; or pass a path to a .json file"
    )
    with pytest.raises(ValueError, match="unknown recipe 'fast'; available: .*tiny-cpu"):
        load_recipe("fast")
    with pytest.raises(ValueError, match="unknown accelerate config 'tpu'; available: cpu-2proc, cpu-single, gpu-"):
        accelerate_config_path("tpu")


def test_bad_preset_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model preset file '.*missing.json' does not exist"):
        load_model_preset(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"n_layer": 2,}')
    with pytest.raises(ValueError, match="broken.json' is not valid JSON"):
        load_model_preset(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json' must hold a JSON object, got list"):
        load_recipe(tmp_path / "list.json")


# ---------------------------------------------------------------------------------------------------------------
# Recipes


def test_tiny_cpu_recipe_is_what_gptb_train_accepts():
    from modeling_gptb.train import TrainArgs

    recipe = load_recipe("tiny-cpu")
    assert "_comment" not in recipe
    unknown = set(recipe) - set(TrainArgs.__dataclass_fields__)
    assert not unknown, f"recipe keys that gptb train rejects: {sorted(unknown)}"
    assert recipe["preset"] in list_presets("models")
    assert recipe["max_steps"] * recipe["batch_size"] * recipe["block_size"] < 1_000_000  # minutes on a CPU
    assert recipe["save_steps"] <= recipe["max_steps"] and recipe["eval_steps"] <= recipe["max_steps"]


# ---------------------------------------------------------------------------------------------------------------
# Accelerate configs

EXPECTED_ACCELERATE = {
    # name: (distributed_type, num_processes, mixed_precision, use_cpu)
    "cpu-single": ("NO", 1, "no", True),
    "cpu-2proc": ("MULTI_GPU", 2, "no", True),  # with ACCELERATE_USE_CPU=1: 2 gloo processes (see the file)
    "gpu-single-bf16": ("NO", 1, "bf16", False),
    "gpu-multi": ("MULTI_GPU", 2, "bf16", False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ACCELERATE))
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = accelerate_config_path(name)
    assert path == REPO / "configuration" / "accelerate" / f"{name}.yaml" and path.is_absolute()
    values = yaml.safe_load(path.read_text())
    assert (values["distributed_type"], values["num_processes"], values["mixed_precision"], values["use_cpu"]) == (
        EXPECTED_ACCELERATE[name]
    )
    assert values["compute_environment"] == "LOCAL_MACHINE" and values["num_machines"] == 1
    config = load_config_from_file(str(path))  # accelerate's own loader: rejects unknown keys and bad enum values
    assert config.num_processes == values["num_processes"]
    assert config.distributed_type.value == values["distributed_type"]


def test_cpu_2proc_documents_the_single_process_trap():
    text = accelerate_config_path("cpu-2proc").read_text()
    assert "ACCELERATE_USE_CPU=1" in text and "--cpu --num_processes 2` silently runs ONE process" in text


def test_accelerate_config_by_path(tmp_path):
    mine = tmp_path / "mine.yml"
    mine.write_text("distributed_type: 'NO'\n")
    assert accelerate_config_path(mine) == mine.resolve()
    assert accelerate_config_path("cpu-single.yaml") == accelerate_config_path("cpu-single")
