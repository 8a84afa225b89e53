"""Run a model card's Python usage snippet as a user would paste it: in a fresh process that cannot import this
package, with stdin closed (so an interactive question shows up as its text in the output, never as a hang), against
a folder or, through the fake Hub of `fake_hub.py`, a repo id."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import WITHOUT_THE_PACKAGE

REPO_ROOT = Path(__file__).resolve().parents[1]

# Everything a user would read as "something is wrong" on the way to the sample.
COMPLAINTS = ("Do you wish to run the custom code", "custom code", "model of type", "Traceback", "trust_remote_code")

_SCRIPT = WITHOUT_THE_PACKAGE + textwrap.dedent(
    """
    hub_root, snippet_file = sys.argv[2], sys.argv[3]
    if hub_root:  # the fake Hub, read from its folder: only huggingface_hub's HTTP transport is replaced
        spec = importlib.util.spec_from_file_location("fake_hub", os.path.join(repo_root, "tests", "fake_hub.py"))
        fake_hub = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fake_hub)
        fake_hub.FakeHub(hub_root).install()
    exec(compile(open(snippet_file).read(), "card-snippet", "exec"))
    assert not any(name == "modeling_gptb" or name.startswith("modeling_gptb.") for name in sys.modules)
    print("SNIPPET-OK")
    """
)


def usage_snippet(card_text: str) -> str:
    """The first ```python block of the card."""
    match = re.search(r"```python\n(.*?)```", card_text, flags=re.DOTALL)
    assert match, "the card has no Python usage snippet"
    return match.group(1)


def run_card_snippet(snippet: str, work: Path, *args, hub_root: Path | None = None) -> subprocess.CompletedProcess:
    """Run `snippet` in a fresh process without this package; `args` follow in `sys.argv[4:]`."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "snippet.py").write_text(snippet)
    (work / "run_snippet.py").write_text(_SCRIPT)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(
        HF_HOME=str(work / "hf-home"),  # an empty cache: a repo id resolves through the fake Hub
        HF_MODULES_CACHE=str(work / "hf-modules"),
        PYTHONNOUSERSITE="1",
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(
        [sys.executable, "run_snippet.py", str(REPO_ROOT), str(hub_root or ""), "snippet.py", *map(str, args)],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )


def assert_ran_without_a_question(proc: subprocess.CompletedProcess):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("SNIPPET-OK"), output
    for complaint in COMPLAINTS:
        assert complaint not in output, f"{complaint!r} in the output:\n{output}"
