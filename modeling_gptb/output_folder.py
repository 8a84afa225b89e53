"""The output folder of `gptb train`: checkpoints that name the run they belong to, and the final model swapped in
all-or-nothing.

    OUT/checkpoints/step-N/     accelerate's state, art_memory.safetensors, trainer_state.json (step, history, run)
    OUT/checkpoints/tokenizer/  the tokenizer a run trained on its data
    OUT/.incoming/              the finished model being written; `READY` inside once it is complete
    OUT/config.json, ...        the Hub-ready model

A checkpoint folder appears by one rename and leaves by one rename (to a hidden name, then deleted), so a kill at
any point never leaves a partial `step-N`. The final model is written whole to `.incoming`, then moved in with
`config.json` last: from `config.json`'s removal to its return the folder does not load at all, so it never loads as
a mix of two models, and the next `gptb train` on the folder finishes the move (`complete_swap`).
"""

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

CHECKPOINTS = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
STATE_FILE = "trainer_state.json"
INCOMING = ".incoming"
READY_FILE = "READY"  # inside `.incoming`: the names of the complete model's files, written last
LOCK_FILE = "gptb-train.lock"  # held (flock) by the run using the folder; `gptb push` skips *.lock
COMMIT_FILE = "config.json"  # moved in last: without it `from_pretrained` refuses the folder
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")

# Tests stop the process with a real SIGKILL at a named point: "checkpoint-saved" (a checkpoint just renamed into
# place), "prune" (an old checkpoint renamed away, not yet deleted), "final-write" (the new model written whole, not
# yet marked ready), "final-swap" (the first file of the new model moved in).
KILL_ENV = "GPTB_TEST_KILL_AT"


def crash_point(name: str):
    """Die here, as from a power cut, when the test environment names this point."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def run_id(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def run_differences(saved: dict, current: dict, sections=("settings", "model", "data")) -> list[str]:
    """The settings in which two run records differ, named as the user sets them."""
    labels = {"settings": "--{}", "model": "--set {}", "data": "the training data ({})"}
    differences = []
    for section in sections:
        label, old, new = labels[section], saved.get(section, {}), current.get(section, {})
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                differences.append(f"{label.format(name)} (checkpoint {old.get(name)!r}, now {new.get(name)!r})")
    return differences


# ---------------------------------------------------------------------------------------------------------------------
# One run per folder


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """
    An exclusive lock on an output folder for the whole of one run: `flock` on `LOCK_FILE` inside it, which the kernel
    releases when the process ends in any way (a `kill -9` included), so a lock file left by a dead process is stale
    and simply taken over. The file records the holder's process id for the refusal message; a clean exit deletes it
    (and the folder, if the run created it and left nothing else).
    """

    def __init__(self, folder: Path):
        self.folder, self.path, self.handle, self.created = folder, folder / LOCK_FILE, None, False

    def acquire(self) -> "FolderLock":
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                self.remove_if_created()
                raise FolderInUse(f"{self.folder} is in use by another gptb train (process {holder})") from None
            try:  # the holder we waited on may have deleted the file as it released it: lock the file now there
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def release(self):
        if self.handle is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiter then sees a new file, never this one
        self.handle.close()
        self.handle = None
        self.remove_if_created()

    def remove_if_created(self):
        if self.created and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoints_in(output: Path) -> list[Path]:
    """The complete checkpoints under `output`, oldest first."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_PATTERN.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    return int(CHECKPOINT_PATTERN.fullmatch(folder.name).group(1))


def read_checkpoint_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def staging_folder(final: Path) -> Path:
    return final.with_name(f".{final.name}.incoming")


def discard(folder: Path):
    """Delete a folder so that no kill leaves part of it under its own name."""
    trash = folder.with_name(f".{folder.name}.trash")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    crash_point("prune")
    shutil.rmtree(trash)


def publish_checkpoint(staging: Path, final: Path, keep: int):
    """Move a written checkpoint into place, then drop all but the newest `keep` of this folder."""
    if final.exists():  # a resumed run saving a step again: its own, identical checkpoint
        discard(final)
    os.replace(staging, final)
    crash_point("checkpoint-saved")
    for old in checkpoints_in(final.parent.parent)[:-keep]:
        discard(old)


def remove_leftovers(output: Path):
    """Hidden staging and trash folders a killed run left in `checkpoints/`."""
    folder = output / CHECKPOINTS
    if folder.is_dir():
        for leftover in folder.glob(".step-*"):
            shutil.rmtree(leftover)


# ---------------------------------------------------------------------------------------------------------------------
# The final model


def looks_like_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def publish_model(staging: Path, output: Path):
    """Move the complete model written to `staging` (`output/.incoming`) into `output`."""
    names = sorted(item.name for item in staging.iterdir())
    for name in names:
        if (staging / name).is_file():
            fsync_file(staging / name)
    ready = staging / READY_FILE
    ready.write_text(json.dumps(names))
    fsync_file(ready)  # on disk after the files it vouches for, before anything of the old model goes
    complete_swap(output)


def fsync_file(path: Path):
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def complete_swap(output: Path) -> bool:
    """
    Finish moving a complete `.incoming` model into `output` (it may have been interrupted at any point), or delete
    an incomplete one, which leaves the old model as it was. True if a model was moved in.
    """
    staging = output / INCOMING
    if not staging.is_dir():
        return False
    ready = staging / READY_FILE
    if not ready.is_file():
        shutil.rmtree(staging)
        return False
    names = json.loads(ready.read_text())
    if (staging / COMMIT_FILE).exists():  # not committed yet: the old model must stop loading before it changes
        (output / COMMIT_FILE).unlink(missing_ok=True)
        for pattern in WEIGHT_PATTERNS:  # the old model's weight files that the new one will not overwrite
            for stale in output.glob(pattern):
                if stale.name not in names:
                    stale.unlink()
    for name in sorted(names, key=lambda name: name == COMMIT_FILE):
        source, target = staging / name, output / name
        if not source.exists():  # moved in before an interruption
            continue
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(source, target)
        crash_point("final-swap")
    ready.unlink()
    staging.rmdir()
    return True
