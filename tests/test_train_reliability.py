"""`gptb train` never loads, resumes or publishes something other than what was asked (issue 11, issue 12 items 5
and 7): run-stamped checkpoints, an all-or-nothing final swap, bit-exact resume with dropout, arguments checked before
any work. The kill tests stop a real `gptb train` process with SIGKILL at named points (`GPTB_TEST_KILL_AT`)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from test_train_cli import TINY_RUN
from transformers import AutoModelForCausalLM

from modeling_gptb import cli
from modeling_gptb.output_folder import KILL_ENV, LOCK_FILE, checkpoints_in, read_checkpoint_state
from modeling_gptb.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
# Dropout on, and checkpoints at steps 2, 4, 6, 8: the third one prunes the first.
RUN = [*TINY_RUN, "--max_steps", "8", "--save_steps", "2", "--set", "resid_pdrop=0.1", "--set", "embd_pdrop=0.1"]


def train(output, *extra) -> int:
    """One `gptb train` in this process, with a fresh Accelerate state as a new process would have."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train_main(["--output_dir", str(output), *RUN, *extra])


def train_killed_at(point: str, output, *extra) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "modeling_gptb.train", "--output_dir", str(output), *RUN, *extra]
    env = {**os.environ, KILL_ENV: point}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, f"not killed at {point!r}: {result.stderr[-2000:]}"
    assert "Removed shared tensor" not in result.stdout + result.stderr  # issue 12 item 7: no noise per checkpoint
    return result


def model_tensors(folder: Path) -> dict:
    """Every weight and every ART buffer of a saved model or checkpoint."""
    tensors = {f"model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    tensors.update({f"art.{k}": v for k, v in load_file(folder / "art_memory.safetensors").items()})
    return tensors


def assert_same_model(folder: Path, expected: Path):
    actual, wanted = model_tensors(folder), model_tensors(expected)
    shared = actual.keys() & wanted.keys()  # a checkpoint stores the tied lm_head once
    assert {k for k in shared if k.startswith("art.")} == {k for k in wanted if k.startswith("art.")}
    assert len(shared) >= len(wanted) - 1
    for name in sorted(shared):
        assert torch.equal(actual[name], wanted[name]), name


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes and modification time."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (seed 0, dropout) that every interrupted and resumed run must equal bit for bit."""
    output = tmp_path_factory.mktemp("reference") / "out"
    assert train(output) == 0
    return output


# ---------------------------------------------------------------------------------------------------------------------
# Item 1: checkpoints belong to one run


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints_and_resume_refuses_other_settings(
    tmp_path, capsys, reference
):
    output = tmp_path / "out"
    assert train(output, "--seed", "1", "--stop_after_step", "6") == 0  # an interrupted run: step-4, step-6
    run = read_checkpoint_state(output / "checkpoints" / "step-6")["run"]
    assert run["settings"]["seed"] == 1 and run["model"]["resid_pdrop"] == 0.1 and run["data"]["sha256"]
    before = snapshot(output)
    capsys.readouterr()

    assert train(output, "--stop_after_step", "2") == 2  # a fresh run (seed 0) in the same folder
    assert "holds checkpoints of an earlier run (step-4, step-6)" in error_line(capsys)
    assert train(output, "--resume", "--seed", "2") == 2
    assert "--seed (checkpoint 1, now 2)" in error_line(capsys)
    assert train(output, "--resume", "--seed", "1", "--set", "art_vigilance=0.2") == 2
    assert "--set art_vigilance (checkpoint 0.9, now 0.2)" in error_line(capsys)
    assert snapshot(output) == before

    assert train(output, "--overwrite_output_dir", "--stop_after_step", "2") == 0  # discards the earlier run's
    assert [p.name for p in checkpoints_in(output)] == ["step-2"]
    assert train(output, "--resume") == 0
    assert_same_model(output, reference)


# ---------------------------------------------------------------------------------------------------------------------
# Item 3: resume is bit-exact, or refused


@pytest.mark.parametrize("stop_after", [3, 4])
def test_resume_with_dropout_is_bit_exact(tmp_path, caplog, capsys, reference, stop_after):
    output = tmp_path / "out"
    assert train(output, "--stop_after_step", str(stop_after)) == 0
    assert train(output, "--resume") == 0
    assert_same_model(output, reference)
    # issue 12 item 7: accelerate's tied-weights warning at every checkpoint is gone
    assert "Removed shared tensor" not in caplog.text + capsys.readouterr().err


def test_a_missing_or_damaged_rng_file_is_an_error_unless_allowed(tmp_path, capsys):
    output = tmp_path / "out"
    assert train(output, "--stop_after_step", "2") == 0
    random_states = output / "checkpoints" / "step-2" / "random_states_0.pkl"
    random_states.unlink()
    capsys.readouterr()
    assert train(output, "--resume") == 2
    line = error_line(capsys)
    assert "random_states_0.pkl" in line and "is missing" in line and "--allow_inexact_resume" in line
    random_states.write_bytes(b"\x00not a pickle")
    assert train(output, "--resume") == 2
    assert "is unreadable" in error_line(capsys)
    assert not (output / "model.safetensors").exists()
    assert train(output, "--resume", "--allow_inexact_resume") == 0
    assert (output / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Item 4: bad arguments, refused in one line before any work


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--save_steps", "0"], "--save_steps must be an integer >= 1, got 0"),
        (["--logging_steps", "0"], "--logging_steps must be an integer >= 1, got 0"),
        (["--eval_steps", "0"], "--eval_steps must be an integer >= 1, got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be an integer >= 1, got 0"),
        (["--max_steps", "0"], "--max_steps must be an integer >= 1, got 0"),
        (["--max_steps", "-3"], "--max_steps must be an integer >= 1, got -3"),
        (["--learning_rate", "0"], "--learning_rate must be a finite number > 0"),
        (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0, got inf"),  # issue 21 item 9
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
        (["--weight_decay", "inf"], "--weight_decay must be a finite number >= 0, got inf"),
        (["--max_grad_norm", "inf"], "--max_grad_norm must be a finite number > 0, got inf"),
        (["--peak_tflops", "inf"], "--peak_tflops must be a finite number > 0, got inf"),
        (["--set", "vocab_size=100"], "--set vocab_size: the run takes these from the tokenizer"),  # item 12
        (["--set", "pad_token_id=3"], "--set pad_token_id: the run takes these from the tokenizer"),
        (["--tokenizer_vocab_size", "100"], "--tokenizer_vocab_size must be an integer >= 258"),
        (["--set", "frobnicate=3"], "--set: unknown model config field(s) frobnicate; known: "),
        (["--set", "art_vigilance=2"], "GPTBConfig.art_vigilance must be a number in [0, 1], got 2"),
        (["--tokenizer", "/nope"], "--tokenizer /nope: no such folder, and not a Hub repo id"),
        (["--init_from", "/nope"], "--init_from /nope: no such folder, and not a Hub repo id"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, extra, message):
    output = tmp_path / "out"
    assert train(output, *extra) == 2
    assert message in error_line(capsys)
    assert not output.exists()


def test_art_report_refuses_a_folder_given_as_file(reference, tmp_path, capsys):
    assert cli.main(["art-report", str(reference), "--file", str(tmp_path)]) == 2
    assert f"--file {tmp_path} is not a file" in error_line(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# Issue 12 item 5: resuming a finished run


def test_resuming_a_finished_run_says_so_and_changes_nothing(reference, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(reference, output)
    before = snapshot(output)
    capsys.readouterr()
    assert train(output, "--resume") == 0
    out = capsys.readouterr().out
    assert "is complete (step 8 of --max_steps 8); nothing to do" in out and f"--init_from {output}" in out
    assert train(output, "--resume", "--max_steps", "16") == 2  # a longer schedule is another run
    line = error_line(capsys)
    assert "--max_steps (checkpoint 8, now 16)" in line and f"--init_from {output}" in line
    assert snapshot(output) == before
    assert train(tmp_path / "more", "--init_from", str(output), "--max_steps", "2") == 0  # the advice works


# ---------------------------------------------------------------------------------------------------------------------
# Kills: a real SIGKILL at named points, then the next run


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint-saved", "prune"])
def test_killed_while_checkpointing_resumes_bit_exact(tmp_path, reference, point):
    output = tmp_path / "out"
    train_killed_at(point, output)
    steps = [p.name for p in checkpoints_in(output)]
    assert steps == (["step-2"] if point == "checkpoint-saved" else ["step-4", "step-6"])  # never a half checkpoint
    assert train(output, "--resume") == 0
    assert_same_model(output, reference)
    assert not list((output / "checkpoints").glob(".step-*"))  # the killed run's leftovers are gone


@pytest.mark.slow
def test_a_killed_final_swap_never_leaves_a_mixed_model(tmp_path, reference, capsys):
    output = tmp_path / "out"
    shutil.copytree(reference, output)  # a good model, and its run's checkpoints
    train_killed_at("final-swap", output, "--overwrite_output_dir", "--seed", "1")
    with pytest.raises((OSError, ValueError)):  # new and old files side by side: the folder must not load at all
        AutoModelForCausalLM.from_pretrained(output)
    assert train(output, "--resume", "--seed", "1") == 0  # the next run moves the finished model in
    assert "Moved in the finished model" in capsys.readouterr().out
    assert_same_model(output, output / "checkpoints" / "step-8")
    assert (
        json.loads((output / "metrics.json").read_text())["run_id"]
        == read_checkpoint_state(output / "checkpoints" / "step-8")["run_id"]
    )
    assert AutoModelForCausalLM.from_pretrained(output).config.resid_pdrop == 0.1


@pytest.mark.slow
def test_a_run_killed_before_the_swap_leaves_the_old_model_whole(tmp_path, reference):
    output = tmp_path / "out"
    shutil.copytree(reference, output)
    before = {name: data for name, (data, _) in snapshot(output).items() if "/" not in name}
    train_killed_at("final-write", output, "--overwrite_output_dir", "--seed", "1")
    after = {name: data for name, (data, _) in snapshot(output).items() if "/" not in name}
    assert after.pop(LOCK_FILE)  # the killed run's lock, stale now (issue 21 item 2)
    assert after == before
    AutoModelForCausalLM.from_pretrained(output)  # still the old model, whole
    assert train(output, "--resume", "--seed", "1") == 0  # resumes the new run and only then replaces the model
    assert_same_model(output, output / "checkpoints" / "step-8")
    assert not (output / ".incoming").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Issue 21 item 1: a run without ART memory trains, resumes and saves its model


def test_a_run_without_art_memory_resumes_and_saves_its_model(tmp_path, capsys):
    output = tmp_path / "out"
    no_art = ("--max_steps", "4", "--set", "art_enabled=false")
    assert train(output, *no_art, "--stop_after_step", "2") == 0
    assert train(output, *no_art, "--resume") == 0
    assert "no ART memory" in capsys.readouterr().out
    assert not (output / "art_memory.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.art_memory is None and model.config.art_enabled is False
    assert json.loads((output / "metrics.json").read_text())["step"] == 4


# ---------------------------------------------------------------------------------------------------------------------
# Issue 21 item 2: one run per output folder


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    output, lock = tmp_path / "out", tmp_path / "out" / LOCK_FILE
    command = [sys.executable, "-m", "modeling_gptb.train", "--output_dir", str(output), *RUN, "--seed", "1"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text()) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert train(output, "--seed", "2") == 2  # while the first one runs
        assert f"--output_dir {output} is in use by another gptb train (process {first.pid})" in error_line(capsys)
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert not lock.exists()  # released at the end
    run = read_checkpoint_state(output / "checkpoints" / "step-8")
    assert (
        run["run"]["settings"]["seed"] == 1
        and json.loads((output / "metrics.json").read_text())["run_id"] == (run["run_id"])
    )

    # a run killed with SIGKILL leaves its lock file behind; the kernel released the lock, so the next run proceeds
    killed = tmp_path / "killed"
    train_killed_at("checkpoint-saved", killed)
    assert (killed / LOCK_FILE).is_file()
    assert train(killed, "--resume") == 0
    assert not (killed / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------------------------------
# Issue 21 item 10: a full disk while checkpointing is one line, exit 2, and the folder stays resumable

FILL_DISK = """
set -e
mount -t tmpfs -o size={size} tmpfs {mount}
status=0
"$@" --output_dir {mount}/out > {log}.out 2> {log}.err || status=$?
echo $status > {log}.rc
mount -o remount,size=64m {mount}  # room again
"$@" --output_dir {mount}/out --resume > /dev/null 2>&1
cp -r {mount}/out {copy}
"""


def private_mount_namespace() -> list[str] | None:
    """The command prefix that runs a shell in a mount namespace of its own, where it may mount a tmpfs: a user
    namespace (`unshare -rm`, no root needed) or, as root, a plain mount namespace (`unshare -m`); None if neither."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-rm"], ["unshare", "-m"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


NAMESPACE = private_mount_namespace()


@pytest.mark.slow
@pytest.mark.skipif(NAMESPACE is None, reason="no mount namespace (neither unprivileged user namespaces nor root)")
@pytest.mark.parametrize("size, writer", [("2000k", "SafetensorError"), ("2300k", "inline_container")])
def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(tmp_path, reference, size, writer):
    """A real full disk: a small tmpfs (mounted in a private mount namespace), full while step-6 is written after
    step-2 and step-4; then the same tmpfs made larger, and --resume. Where no namespace is at hand the RLIMIT_FSIZE
    test below covers the same promise."""
    mount, log, copy = tmp_path / "disk", tmp_path / "first", tmp_path / "out"
    mount.mkdir()
    script = FILL_DISK.format(size=size, mount=mount, log=log, copy=copy)
    command = [*NAMESPACE, "sh", "-c", script, "sh", sys.executable, "-m", "modeling_gptb.train", *RUN]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(f"{log}.rc").read_text().strip() == "2"
    errors = [line for line in Path(f"{log}.err").read_text().splitlines() if "gptb train: error" in line]
    assert len(errors) == 1 and "Traceback" not in Path(f"{log}.err").read_text()
    line = errors[0][errors[0].index("gptb train: error") :]
    assert f"no space left on the disk mounted at {mount}" in line and "while writing checkpoint step-6" in line
    assert f"in {mount}/out/checkpoints" in line and writer in line and "continue with --resume" in line
    assert_same_model(copy, reference)  # resumed from step-4, bit for bit


def test_a_file_size_limit_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, reference):
    """The same failure where no tmpfs can be mounted: writes past RLIMIT_FSIZE fail with EFBIG, as on a full disk."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # below model.safetensors' 325 kB

    output = tmp_path / "out"
    command = [sys.executable, "-m", "modeling_gptb.train", "--output_dir", str(output), *RUN]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert first.returncode == 2 and "Traceback" not in first.stderr, first.stderr[-2000:]
    errors = [line for line in first.stderr.splitlines() if "gptb train: error" in line]  # the rest is tqdm's bar
    assert len(errors) == 1 and "while writing checkpoint step-2" in errors[0] and "os error 27" in errors[0]
    assert not list((output / "checkpoints").glob(".step-*"))  # the partial checkpoint is gone
    assert train(output) == 0  # with the limit lifted, the run starts over in the same folder
    assert_same_model(output, reference)


# ---------------------------------------------------------------------------------------------------------------------
# Issue 21 item 12: a warmup longer than the run is said


def test_a_warmup_longer_than_the_run_is_said(tmp_path, capsys):
    assert train(tmp_path / "out", "--max_steps", "2", "--warmup_steps", "100000") == 0
    out = capsys.readouterr().out
    assert "Warning: --warmup_steps 100000 exceeds --max_steps 2: the learning rate rises for the whole run" in out
    assert "ends at 6e-08, never reaching --learning_rate 0.003" in out
