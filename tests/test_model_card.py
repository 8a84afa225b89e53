"""Model cards: metadata, body, usage snippet, "n/a" for what is missing, round trip through ModelCard.load."""

import configparser
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from card_snippet import REPO_ROOT, assert_ran_without_a_question, run_card_snippet, usage_snippet
from huggingface_hub import ModelCard

from modeling_gptb import remote_card
from modeling_gptb.model_card import USAGE_PLACEHOLDER, render_model_card, template_path
from modeling_gptb.presets import load_model_preset

TRAINING = {
    "steps": 160,
    "tokens": 327_680,
    "eval_loss": 3.212345,
    "eval_perplexity": 24.837,
    "data": "stdlib-docs: docstrings of the Python 3.11 standard library",
    "learning_rate": 0.002,
}


@pytest.fixture(scope="module")
def config():
    from modeling_gptb.configuration_gptb import GPTBConfig

    return GPTBConfig(**load_model_preset("gptb-tiny"))


@pytest.fixture(scope="module")
def card(config):
    return render_model_card(
        config,
        training=TRAINING,
        art_report={"num_categories": 17, "rejected": 0},
        repo_id="someone/gptb-tiny-stdlib",
        datasets=["someone/stdlib-docstrings"],
        num_parameters=1_053_184,
    )


def header(card: ModelCard) -> dict:
    """The YAML metadata block parsed on its own, as the Hub would."""
    _, block, _ = card.content.split("---\n", 2)
    return yaml.safe_load(block)


def test_metadata(card):
    meta = header(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["someone/stdlib-docstrings"]
    assert {"gptb", "recurrent", "custom_code", "art-memory"} <= set(meta["tags"])
    assert "base_model" not in meta
    assert card.data.to_dict() == meta


def test_body_reports_architecture_art_and_training(card):
    text = card.text
    for row in (
        "| Layers | 2 |",
        "| Width (`n_embd`) | 128 |",
        "| Attention heads | 4 |",
        "| MLP width (`n_inner`) | 512 (4 x n_embd) |",
        "| State size M (slots) | 8 |",
        "| Tokens per step K (`segment_length`) | 1 |",
        "| State per sequence | 8 x 128 = 1,024 numbers (4.0 KiB in float32), constant in the sequence length |",
        "| Parameters | 1,053,184 |",
        "| Rule | cosine |",
        "| Vigilance | 0.9 |",
        "| Categories learned | 17 |",
        "| Rejected | 0 |",
        "| Steps | 160 |",
        "| Tokens | 327,680 |",
        "| Eval loss | 3.2123 |",
        "| Eval perplexity | 24.84 |",
        "| Learning rate | 0.002 |",
        "| Data | stdlib-docs: docstrings of the Python 3.11 standard library |",
    ):
        assert row in text, row
    assert "| `rebias` | true: bidirectional attention" in text
    assert "## Limitations" in text
    assert "M + 1 positions" in text and "write slots" not in text


def test_a_segment_model_card_describes_segment_steps(config):
    text = render_model_card({**config.to_dict(), "segment_length": 64}).text
    assert "| Tokens per step K (`segment_length`) | 64 |" in text
    assert "[read slots; the K tokens; write slots], 2M + K positions" in text and "M + 1 positions" not in text
    assert "| `rebias` | true: the segment mask (read slots read each other" in text


def test_usage_snippet(card):
    text = card.text
    assert 'AutoModelForCausalLM.from_pretrained("someone/gptb-tiny-stdlib", trust_remote_code=True)' in text
    assert 'tokenizer = PreTrainedTokenizerFast.from_pretrained("someone/gptb-tiny-stdlib")\n' in text
    assert text.startswith("\n# gptb-tiny-stdlib\n")


def test_round_trip_with_model_card_load(card, tmp_path):
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    assert loaded.content == card.content
    assert loaded.data.to_dict() == card.data.to_dict()
    assert header(loaded)["tags"] == card.data.tags


def test_missing_values_render_as_na():
    card = render_model_card({})
    assert "{{" not in card.content and "{%" not in card.content
    assert "None" not in card.text
    for row in ("| Layers | n/a |", "| Eval loss | n/a |", "| Steps | n/a |", "| State per sequence | n/a |"):
        assert row in card.text, row
    assert 'from_pretrained("path/to/gptb-model", trust_remote_code=True)' in card.text
    assert "without its ART memory" in card.text and "art-memory" not in card.data.tags
    assert "datasets" not in header(card)


def test_dict_config_base_model_extra_tags_and_cell_escaping(config):
    card = render_model_card(
        config.to_dict(),
        base_model="openai-community/gpt2",
        training={"data": "a | b", "eval_loss": None, "eval_perplexity": float("nan")},
        art_report={"num_categories": 3},
        license="mit",
        tags=["demo", "gptb"],
    )
    meta = header(card)
    assert meta["base_model"] == "openai-community/gpt2" and meta["license"] == "mit"
    assert meta["tags"].count("gptb") == 1 and "demo" in meta["tags"]
    assert "Warm-started from [openai-community/gpt2](https://huggingface.co/openai-community/gpt2)" in card.text
    assert "| Data | a \\| b |" in card.text  # a pipe would otherwise split the table cell
    assert "| Eval loss | n/a |" in card.text and "| Eval perplexity | n/a |" in card.text


def test_custom_template(config, tmp_path):
    assert template_path().is_file()
    mine = tmp_path / "card.md"
    mine.write_text("---\n{{ card_data }}\n---\n\nState {{ state_size }}, loss {{ eval_loss }}.\n")
    card = render_model_card(config, template=mine, training={"eval_loss": 2.5})
    assert card.text.strip() == "State 8, loss 2.5000."


# ---------------------------------------------------------------------------------------------------------------------
# One card (issue 12 item 3): `gptb train` and `save_pretrained` render the same template from the model's own facts;
# its usage snippet runs as pasted, without a question (item 1)

TINY_TRAIN = [
    "--max_chars", "20000", "--tokenizer_vocab_size", "300", "--block_size", "16", "--batch_size", "4",
    "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "2", "--eval_batches", "1",
    "--sample_tokens", "4", "--set", "n_embd=32", "--set", "n_head=4", "--set", "state_size=3",
]  # fmt: skip


def table_rows(card: ModelCard) -> list[str]:
    """The label of every table row, in order: the card's structure without its values."""
    return re.findall(r"^\| ([^|]+?) \|", card.text, flags=re.MULTILINE)


def test_gptb_train_and_save_pretrained_write_one_card_with_the_models_facts(tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "modeling_gptb.train", "--output_dir", str(output), *TINY_TRAIN],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out evaluation texts (their first 60 characters): each text" in proc.stdout  # ART header
    model = AutoModelForCausalLM.from_pretrained(output)
    model.save_pretrained(tmp_path / "saved")
    trained, saved = (ModelCard.load(folder / "README.md") for folder in (output, tmp_path / "saved"))

    assert table_rows(trained) == table_rows(saved)  # one template
    parameters = f"| Parameters | {model.num_parameters():,} |"
    categories = f"| Categories learned | {model.art_memory.num_categories:,} |"
    for card in (trained, saved):
        assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
        assert {"gptb", "custom_code", "art-memory"} <= set(card.data.tags)
        for row in (parameters, categories, "| State size M (slots) | 3 |"):
            assert row in card.text, row
        assert "PreTrainedTokenizerFast.from_pretrained(" in card.text
    metrics = json.loads((output / "metrics.json").read_text())
    assert f"| Eval loss | {metrics['eval_loss']:.4f} |" in trained.text
    assert f"| Tokens | {2 * 4 * 16:,} |" in trained.text and "| Steps | 2 |" in trained.text
    assert "| Eval loss | n/a |" in saved.text  # save_pretrained does not know it: n/a, never a made-up value


def test_the_save_pretrained_cards_snippet_runs_from_a_folder_without_a_question(tmp_path):
    from conftest import tiny_model

    from modeling_gptb.tokenization import byte_tokenizer

    folder = tmp_path / "my-gptb"
    tiny_model(vocab_size=258, pad_token_id=1, art_enabled=True).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    snippet = usage_snippet((folder / "README.md").read_text())
    assert USAGE_PLACEHOLDER in snippet
    proc = run_card_snippet(snippet.replace(USAGE_PLACEHOLDER, str(folder)), tmp_path / "work")
    assert_ran_without_a_question(proc)


def test_auto_tokenizer_asks_nothing_where_the_package_is_imported(tmp_path):
    """With `import modeling_gptb` (the README's way), `AutoTokenizer.from_pretrained(folder)` knows the model type:
    no remote-code question, no "model of type" warning. (Without the package, transformers 5.24 reads config.json and
    its auto_map before the tokenizer files, so it must ask: the card loads the tokenizer with
    PreTrainedTokenizerFast, which reads no config.)"""
    from conftest import tiny_model

    from modeling_gptb.tokenization import byte_tokenizer

    folder = tmp_path / "my-gptb"
    tiny_model(vocab_size=258, pad_token_id=1).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    code = (
        "import modeling_gptb\n"
        "from transformers import AutoTokenizer\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})\n"
        "print('TOKENS', tokenizer('hello').input_ids)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "TOKENS" in proc.stdout
    assert "Do you wish" not in output and "model of type" not in output, output


# ---------------------------------------------------------------------------------------------------------------------
# Issue 20 item 4: a source link and an install line from one place, and a card in every saved folder


def setup_cfg_url() -> str:
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    return parser["metadata"]["url"]


def test_the_remote_codes_fallback_source_address_is_setup_cfgs():
    assert remote_card.SOURCE_URL == setup_cfg_url()


def test_the_source_address_comes_from_the_installed_packages_metadata(monkeypatch):
    def fork_metadata(name):
        assert name == "gptb"
        return {"Home-page": "https://example.org/fork/gptb"}

    monkeypatch.setattr(importlib.metadata, "metadata", fork_metadata)
    text = " ".join(render_model_card({"n_embd": 64}).text.split())
    assert "[`docs/design.md`](https://example.org/fork/gptb/blob/main/docs/design.md)" in text
    assert '(`pip install "gptb @ git+https://example.org/fork/gptb"`)' in text

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "metadata", not_installed)  # the remote code, without the package
    assert remote_card.source_url() == remote_card.SOURCE_URL


# Runs where only the remote code is at hand: load the folder, train a step with the real Trainer, save.
REMOTE_ONLY_TRAINER = """
import sys, torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

model = AutoModelForCausalLM.from_pretrained(sys.argv[4], trust_remote_code=True)
rows = [{"input_ids": torch.arange(1, 9) + i, "labels": torch.arange(1, 9) + i} for i in range(4)]
args = TrainingArguments(sys.argv[5], max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=rows)
trainer.train()
trainer.save_model(sys.argv[5])
"""


@pytest.mark.smoke
def test_trainer_save_model_after_a_remote_code_load_writes_a_short_card(tmp_path):
    from conftest import tiny_model

    folder, output = tmp_path / "my-gptb", tmp_path / "trained"
    tiny_model(art_enabled=True).save_pretrained(folder)
    (folder / "README.md").unlink()  # the remote code alone must write one
    proc = run_card_snippet(REMOTE_ONLY_TRAINER, tmp_path / "work", folder, output)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("SNIPPET-OK"), proc.stdout + proc.stderr
    saved = ModelCard.load(output / "README.md")
    text = " ".join(saved.text.split())
    assert saved.data.library_name == "transformers" and saved.data.pipeline_tag == "text-generation"
    assert {"gptb", "custom_code", "art-memory"} <= set(saved.data.tags)
    assert "written by the model's remote code, without the `gptb` package" in text  # the short card
    assert "## Limitations" not in text  # the package's template was not at hand
    assert f"[docs/design.md]({remote_card.design_url()})" in text and remote_card.install_command() in text
    assert "| State size M (slots) | 3 |" in text and "trust_remote_code=True" in text
