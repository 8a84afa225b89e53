"""Pushing to the Hub (issue 4 item 6): `model.push_to_hub` and `gptb push` through the real huggingface_hub upload and
download code, with only the HTTP transport replaced by the fake Hub of `fake_hub.py`; then a fresh process without
the package loads the pushed repo id with `trust_remote_code=True`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub.constants as hub_constants
import huggingface_hub.utils._http as hub_http
import pytest
import torch
from card_snippet import assert_ran_without_a_question, run_card_snippet, usage_snippet
from conftest import WITHOUT_THE_PACKAGE, randomize, tiny_config, tiny_model, tiny_tokenizer
from fake_hub import FakeHub
from huggingface_hub import ModelCard, hf_hub_download, snapshot_download
from safetensors import safe_open

from modeling_gptb import cli
from modeling_gptb.art_memory import ART_MEMORY_FILE
from modeling_gptb.model_card import render_model_card

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.tensor([[5, 17, 3, 42, 8, 60, 1], [9, 9, 2, 33, 14, 7, 0]])
MODEL_FILES = {"config.json", "model.safetensors", ART_MEMORY_FILE, "generation_config.json", "README.md"}
MODEL_FILES |= {"configuration_gptb.py", "modeling_gptb.py", "art_memory.py"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """huggingface_hub online, its caches (and token, xet, ...) under tmp_path, and its traffic sent to a fake Hub."""
    home, real_home = str(tmp_path / "hf-home"), hub_constants.HF_HOME
    for name, value in list(vars(hub_constants).items()):  # every path derived from HF_HOME at import time
        if name.isupper() and isinstance(value, str) and value.startswith(real_home):
            monkeypatch.setattr(hub_constants, name, home + value[len(real_home) :])
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", os.path.join(home, "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_CACHE", os.path.join(home, "hub"))
    fake = FakeHub(tmp_path / "fake-hub")
    factory = hub_http._GLOBAL_CLIENT_FACTORY
    with fake.installed():
        yield fake
    assert hub_http._GLOBAL_CLIENT_FACTORY is factory  # huggingface_hub's own client again
    assert not fake.unhandled, f"the fake Hub was asked for what it does not serve: {fake.unhandled}"


def trained_model(seed=3, **overrides):
    """A tiny GPTB model whose ART memory has learned several categories."""
    model = randomize(tiny_model(art_enabled=True, art_vigilance=0.99, **overrides), seed=seed)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 60, (6, 5), generator=torch.Generator().manual_seed(seed)))
    model.eval()
    assert model.art_memory.num_categories > 1
    return model


def safetensors_contents(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# model.push_to_hub, then a fresh process loads the repo id with trust_remote_code


FRESH_PROCESS = WITHOUT_THE_PACKAGE + textwrap.dedent(
    """
    hub_root, repo_id, work = sys.argv[2], sys.argv[3], sys.argv[4]

    # the same fake Hub, read from its folder: only huggingface_hub's HTTP transport is replaced
    spec = importlib.util.spec_from_file_location("fake_hub", os.path.join(repo_root, "tests", "fake_hub.py"))
    fake_hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_hub)
    hub = fake_hub.FakeHub(hub_root)
    hub.install()

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
    module = type(model).__module__
    assert type(model).__name__ == "GPTBLMHeadModel" and module.startswith("transformers_modules."), module
    with torch.no_grad():
        logits = model(torch.load(os.path.join(work, "tokens.pt"))).logits
    assert not any(name == "modeling_gptb" or name.startswith("modeling_gptb.") for name in sys.modules)
    results = {"logits": logits, "prototypes": model.art_memory.prototypes, "counts": model.art_memory.counts}
    results.update(requests=hub.requests, unhandled=hub.unhandled)
    torch.save(results, os.path.join(work, "results.pt"))
    print("OK")
    """
)


@pytest.mark.smoke
@pytest.mark.parametrize("state_update", ["replace", "gated", "addressed"])
def test_push_to_hub_then_a_fresh_process_loads_the_repo_id_with_remote_code(hub, tmp_path, state_update):
    model = trained_model(state_update=state_update)  # randomized: a variant's own weights count in the logits
    url = model.push_to_hub("org/name")
    assert str(url).startswith("https://huggingface.co/org/name/commit/")
    assert MODEL_FILES <= set(hub.files("org/name"))

    # the card is GPTB's (save_pretrained's), not transformers' generic one, and names the repo in its usage snippet
    card = ModelCard.load("org/name")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"gptb", "custom_code", "art-memory"} <= set(card.data.tags)
    assert 'from_pretrained("org/name", trust_remote_code=True)' in card.text
    assert "automatically generated" not in card.text

    work = tmp_path / "work"
    work.mkdir()
    torch.save(TOKENS, work / "tokens.pt")
    (work / "load_from_hub.py").write_text(FRESH_PROCESS)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(
        HF_HOME=str(tmp_path / "fresh-hf-home"),  # an empty cache: everything comes from the fake Hub
        HF_MODULES_CACHE=str(tmp_path / "fresh-hf-modules"),
        PYTHONNOUSERSITE="1",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "load_from_hub.py", str(REPO_ROOT), str(hub.root), "org/name", str(work)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
    results = torch.load(work / "results.pt")
    with torch.no_grad():
        assert torch.equal(results["logits"], model(TOKENS).logits)
    assert torch.equal(results["prototypes"], model.art_memory.prototypes)
    assert torch.equal(results["counts"], model.art_memory.counts)
    assert not results["unhandled"], results["unhandled"]
    downloaded = {path.rsplit("/", 1)[-1] for method, path in results["requests"] if method == "GET"}
    assert {"modeling_gptb.py", "art_memory.py", "state_update.py", "model.safetensors", ART_MEMORY_FILE} <= downloaded
    module_files = {path.name for path in (tmp_path / "fresh-hf-modules").rglob("*.py")}
    assert {"configuration_gptb.py", "modeling_gptb.py", "art_memory.py", "state_update.py"} <= module_files


def test_push_to_hub_keeps_the_card_a_repo_already_has(hub, tmp_path):
    model = trained_model()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    custom = "---\nlicense: mit\ntags:\n- mine\n---\n\n# Written by hand on the Hub\n"
    (folder / "README.md").write_text(custom)
    assert cli.main(["push", str(folder), "org/card"]) == 0

    model.push_to_hub("org/card", tags=["fine-tuned"])
    card = ModelCard.load("org/card")
    assert card.data.license == "mit" and card.data.tags == ["mine", "fine-tuned"]
    assert "Written by hand on the Hub" in card.text


def test_save_pretrained_push_to_hub_uploads_the_art_memory_and_leaves_the_folder_card(hub, tmp_path):
    model = trained_model()
    folder = tmp_path / "gptb-local"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# My notes\n")
    model.save_pretrained(folder, push_to_hub=True, repo_id="org/saved")
    assert (folder / "README.md").read_text() == "---\nlicense: mit\n---\n\n# My notes\n"
    remote = hub.files("org/saved")
    assert MODEL_FILES <= set(remote)
    for name in MODEL_FILES - {ART_MEMORY_FILE}:
        assert remote[name] == (folder / name).read_bytes(), name
    # the subclass writes the ART memory again once the upload is done; safetensors orders its metadata differently
    # from one write to the next, so compare what the file holds
    (tmp_path / "remote.safetensors").write_bytes(remote[ART_MEMORY_FILE])
    uploaded, local = (safetensors_contents(p) for p in (tmp_path / "remote.safetensors", folder / ART_MEMORY_FILE))
    assert uploaded[1] == local[1] and uploaded[0].keys() == local[0].keys()
    assert all(torch.equal(uploaded[0][key], local[0][key]) for key in local[0])


def test_save_pretrained_writes_a_card_only_where_there_is_none(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path / "new")
    card = ModelCard.load(tmp_path / "new" / "README.md")
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags
    assert "trust_remote_code=True" in card.text and card.data.license == "apache-2.0"
    assert "| Rule | cosine |" in card.text and "| Vigilance | 0.99 |" in card.text
    assert f"| Parameters | {model.num_parameters():,} |" in card.text
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my own card\n")
    model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "README.md").read_text() == "my own card\n"


# ---------------------------------------------------------------------------------------------------------------------
# gptb push FOLDER REPO_ID


def train_style_folder(folder: Path) -> Path:
    """What `gptb train` leaves (model, tokenizer, rendered card, metrics, plot) plus the leftovers push must skip."""
    model = trained_model(seed=5)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    card = render_model_card(
        model.config,
        training={"steps": 6, "eval_loss": 3.25, "eval_perplexity": 25.8, "data": "stdlib-docs"},
        art_report={"num_categories": model.art_memory.num_categories},
        repo_id="org/trained",
    )
    card.save(folder / "README.md")
    (folder / "metrics.json").write_text(json.dumps({"step": 6, "eval_perplexity": 25.8}))
    (folder / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    for leftover in ("checkpoints/step-6/model.safetensors", "checkpoints/step-9.tmp/x", ".incoming/config.json"):
        (folder / leftover).parent.mkdir(parents=True, exist_ok=True)
        (folder / leftover).write_bytes(b"not for the Hub")
    (folder / f".{ART_MEMORY_FILE}.0123abcd.tmp").write_bytes(b"half written")
    return folder


def test_gptb_push_uploads_a_trained_folder_byte_for_byte(hub, tmp_path, capsys):
    folder = train_style_folder(tmp_path / "run")
    assert cli.main(["push", str(folder), "org/trained"]) == 0
    assert "https://huggingface.co/org/trained" in capsys.readouterr().out

    expected = {name: data for name, data in local_files(folder).items() if not name.startswith(("checkpoints/", "."))}
    assert MODEL_FILES | {"tokenizer.json", "metrics.json", "training_curves.png"} <= set(expected)
    assert hub.files("org/trained") == expected  # nothing more (no leftovers), nothing less

    snapshot = Path(snapshot_download("org/trained"))
    assert local_files(snapshot) == expected
    single = hf_hub_download("org/trained", ART_MEMORY_FILE, force_download=True)
    assert Path(single).read_bytes() == expected[ART_MEMORY_FILE]
    card = ModelCard.load("org/trained")  # the rendered card, not a generic one
    assert "custom_code" in card.data.tags and "25.80" in card.text


def test_the_pushed_cards_snippet_loads_model_and_tokenizer_from_the_repo_id_without_a_question(hub, tmp_path):
    folder = train_style_folder(tmp_path / "run")
    assert cli.main(["push", str(folder), "org/trained"]) == 0
    snippet = usage_snippet(ModelCard.load("org/trained").text)
    assert 'from_pretrained("org/trained")' in snippet  # the tokenizer line: no trust_remote_code
    assert_ran_without_a_question(run_card_snippet(snippet, tmp_path / "work", hub_root=hub.root))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "is not a folder"),
        ("empty", "holds no config.json"),
        ("gpt2", "not a GPTB model"),
        ("no-weights", "holds no model.safetensors"),
        ("broken-config", "not a valid model config"),
    ],
)
def test_gptb_push_refuses_a_folder_that_is_not_a_model(hub, tmp_path, capsys, kind, message):
    folder = tmp_path / kind
    if kind != "missing":
        folder.mkdir()
    if kind == "gpt2":
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        (folder / "model.safetensors").write_bytes(b"weights")
    elif kind == "no-weights":
        tiny_config().save_pretrained(folder)
    elif kind == "broken-config":
        (folder / "config.json").write_text("{not json")
    assert cli.main(["push", str(folder), "org/nothing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptb push: error:") and message in err and err.count("\n") == 1, err
    assert hub.requests == [] and not hub.exists("org/nothing")
