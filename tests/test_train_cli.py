"""`gptb train` (Accelerate) end to end on tiny sizes: Hub-ready output, resume, two processes, bad input."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_gptb import cli
from modeling_gptb.train import TrainArgs, build_tokenizer
from modeling_gptb.train import main as train_main

REPO = Path(__file__).resolve().parents[1]

TINY_RUN = [
    "--max_chars", "20000", "--tokenizer_vocab_size", "300", "--block_size", "16", "--batch_size", "4",
    "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "3", "--eval_batches", "2",
    "--sample_tokens", "8", "--set", "n_embd=32", "--set", "n_head=4", "--set", "state_size=3",
]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator, as a fresh process would."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train(output_dir, *extra) -> int:
    return train_main(["--output_dir", str(output_dir), *TINY_RUN, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "out"
    AcceleratorState._reset_state(True)
    assert train(output) == 0
    return output


def test_output_is_a_hub_ready_folder(trained):
    names = {p.name for p in trained.iterdir()}
    expected = {"config.json", "model.safetensors", "art_memory.safetensors", "generation_config.json"}
    expected |= {"configuration_gptb.py", "modeling_gptb.py", "art_memory.py", "tokenizer.json", "README.md"}
    expected |= {"training_curves.png", "metrics.json"}
    assert expected <= names
    config = json.loads((trained / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gptb.GPTBLMHeadModel"
    card = ModelCard.load(trained / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "custom_code" in card.data.tags and "trust_remote_code=True" in card.text
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["eval_perplexity"] > 1 and metrics["sample"]
    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert model.art_memory.num_categories > 0
    ids = tokenizer("Return the", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    assert (trained / "checkpoints" / "step-6" / "art_memory.safetensors").is_file()


@pytest.mark.smoke
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")  # the default is what is tested
def test_the_saved_generation_config_leaves_length_and_sampling_to_the_caller(trained):
    # Issue 20 item 2: a saved max_new_tokens=100 beat generate(max_length=12), and a saved do_sample/top_k made a
    # plain generate() sample. The folder keeps the special tokens only, so transformers' defaults apply.
    saved = json.loads((trained / "generation_config.json").read_text())
    assert not {"max_new_tokens", "max_length", "do_sample", "top_k", "temperature"} & set(saved), saved
    model = AutoModelForCausalLM.from_pretrained(trained)
    ids = AutoTokenizer.from_pretrained(trained)("Return the", return_tensors="pt").input_ids
    assert model.generate(ids, max_length=12).shape == (1, 12)
    plain = []
    for seed in (1, 2):  # a plain generate() that sampled would differ between seeds
        torch.manual_seed(seed)
        plain.append(model.generate(ids, min_new_tokens=20))  # min_new_tokens: no early end-of-text
    greedy = model.generate(ids, do_sample=False, max_new_tokens=20)
    assert plain[0].shape == (1, ids.shape[1] + 20)  # transformers' default: 20 new tokens
    assert torch.equal(plain[0], greedy) and torch.equal(plain[1], greedy)


def test_resume_ends_like_the_uninterrupted_run(trained, tmp_path):
    output = tmp_path / "out"
    assert train(output, "--stop_after_step", "3") == 0
    assert not (output / "model.safetensors").exists()  # interrupted: no final model yet
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert train(output, "--resume") == 0
    for file in ("model.safetensors", "art_memory.safetensors"):  # bit for bit
        whole, resumed = load_file(trained / file), load_file(output / file)
        assert whole.keys() == resumed.keys()
        for name in whole:
            assert torch.equal(resumed[name], whole[name]), name


def test_sample_tokens_zero_skips_the_sample(tmp_path):
    assert train(tmp_path / "out", "--max_steps", "1", "--sample_tokens", "0") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["step"] == 1 and "sample" not in metrics


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_cpu_processes_with_bf16(tmp_path, launcher):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    port = str(free_port())
    if launcher == "accelerate":
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
        command += ["--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "bf16"]
        command += ["--main_process_port", port]
    else:
        command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", port]
    command += ["-m", "modeling_gptb.train", "--output_dir", str(tmp_path / "out"), *TINY_RUN]
    command += ["--max_steps", "2", "--save_steps", "2", "--eval_steps", "2", "--mixed_precision", "bf16"]
    try:
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as hang:
        pytest.fail(f"two-process run hung; its output:\n{hang.stdout}\n{hang.stderr}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), mixed precision bf16" in result.stdout
    assert "ART memory identical on all 2 ranks" in result.stdout
    assert result.stdout.count("step 2: eval loss") == 1  # printed by the main process only
    assert (tmp_path / "out" / "art_memory.safetensors").is_file()
    memory = load_file(tmp_path / "out" / "art_memory.safetensors")
    assert int(memory["counts"].sum()) == 2 * 4 * 2  # steps x batch x ranks: every rank's sequences


def failing(capsys, output, *extra, message):
    assert train(output, *extra) == 2
    assert message in capsys.readouterr().err


def test_bad_input_fails_clearly(tmp_path, capsys, trained):
    failing(capsys, tmp_path / "a", "--data", str(tmp_path / "missing"), message="missing")
    (tmp_path / "empty").mkdir()
    failing(capsys, tmp_path / "b", "--data", str(tmp_path / "empty"), message="empty")
    failing(capsys, tmp_path / "c", "--preset", "gptb-huge", message="available: gptb-small, gptb-tiny")
    failing(capsys, trained, message="already holds a trained model")
    (tmp_path / "notckpt").mkdir()
    failing(capsys, tmp_path / "d", "--resume", str(tmp_path / "notckpt"), message="not a GPTB training checkpoint")
    failing(capsys, tmp_path / "e", "--resume", message="no checkpoint under")
    small = tmp_path / "small.txt"  # enough to train on, but its held-out last 5% is shorter than a block of 64
    small.write_text("".join(f"line {i} of a small file\n" for i in range(60)))
    failing(capsys, tmp_path / "f", "--data", str(small), "--block_size", "64", message="held-out text of text files")


def test_damaged_checkpoint_and_a_failed_run_never_replace_a_good_model(tmp_path, capsys, trained):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(trained, output)
    before = (output / "model.safetensors").read_bytes()
    checkpoint = output / "checkpoints" / "step-3"  # an unfinished point of the run (step-6 ends it: nothing to do)
    (checkpoint / "model.safetensors").write_bytes(b"\x00garbage")
    failing(capsys, output, "--resume", str(checkpoint), message="is damaged or does not fit this model")
    # a new run that fails (no data) with permission to overwrite leaves the old model untouched
    failing(capsys, output, "--overwrite_output_dir", "--data", str(tmp_path / "nope"), message="nope")
    assert (output / "model.safetensors").read_bytes() == before


def test_generate_and_art_report_commands(trained, capsys):
    assert cli.main(["generate", str(trained), "--prompt", "Return the", "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("Return the")
    assert cli.main(["art-report", str(trained), "--text", "Return the number of items."]) == 0
    out = capsys.readouterr().out
    assert "categories from" in out and "novelty" in out and "Return the number" in out
    assert cli.main(["generate", str(trained / "nothing"), "--prompt", "x"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_report_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train(tmp_path / "out", "--max_steps", "4", "--logging_steps", "2", "--report_to", "tensorboard") == 0
    events = sorted((tmp_path / "out").rglob("events.out.tfevents.*"))
    logged = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        logged |= set(accumulator.Tags()["scalars"])
    assert {"loss", "tokens_per_s", "art_categories", "eval_loss", "eval_perplexity"} <= logged


def test_a_kept_tokenizer_is_reused_only_for_the_same_texts_or_a_resume(tmp_path):
    from accelerate import Accelerator

    accelerator, preset = Accelerator(cpu=True), {"vocab_size": 300}
    args = TrainArgs(output_dir=str(tmp_path))
    texts = ["the same small corpus, " * 40, "with two documents. " * 40]
    other = ["a failed run on other text left its tokenizer behind " * 40]

    def vocabulary(corpus, resuming=False):
        return build_tokenizer(args, corpus, preset, accelerator, tmp_path, resuming).get_vocab()

    first = vocabulary(texts)
    kept = tmp_path / "checkpoints" / "tokenizer" / "tokenizer.json"
    written = kept.stat().st_mtime_ns
    assert vocabulary(texts) == first and kept.stat().st_mtime_ns == written  # same texts: reused, not retrained
    assert vocabulary(other, resuming=True) == first  # a resumed run keeps the tokenizer its weights know
    assert vocabulary(other) != first  # a fresh run on other texts trains its own
    assert vocabulary(texts) == first  # and back: deterministic training
