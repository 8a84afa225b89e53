"""The documentation a user of the repository reads: docs/design.md exists and is complete, and no link is dangling.

Issue 12 item 2: the README linked to a design document outside the repository. These checks read the files the
repository holds (git's list of them; every file under the root when git is not there).
"""

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest
from transformers import PretrainedConfig

from modeling_gptb import GPTBConfig
from modeling_gptb.model_card import render_model_card
from modeling_gptb.remote_card import design_url

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
ORIGINAL_SPEC = "DESIGN" + ".md"  # the original spec's file name (spelled so that this file does not mention it)
# Folders that are never part of the repository (environments, caches, build output).
NOT_IN_REPO = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "build", "dist"}


def repository_files() -> list[Path]:
    """The files of the repository: tracked and new ones that git does not ignore."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, subfolders, names in os.walk(ROOT):
            subfolders[:] = [s for s in subfolders if s not in NOT_IN_REPO and not s.endswith(".egg-info")]
            files += [Path(folder) / name for name in names]
    return [path for path in files if path.is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary: no references in it


def without_code_blocks(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub (and the Hub) give the headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", without_code_blocks(markdown), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def markdown_links(markdown: str) -> list[str]:
    """Targets of the inline links and images, outside code."""
    prose = re.sub(r"`[^`\n]*`", "", without_code_blocks(markdown))
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def test_no_file_refers_to_a_design_document_outside_the_repository():
    # Users with the repository alone cannot read it: every reference must point to docs/design.md instead.
    assert not (ROOT / ORIGINAL_SPEC).exists()
    stale = []
    for path in repository_files():
        text = text_of(path)
        if text is not None:
            stale += [
                f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
                for m in re.finditer(re.escape(ORIGINAL_SPEC), text)
            ]
    assert not stale, (
        f"references to {ORIGINAL_SPEC}, which the repository does not hold (use docs/design.md): {stale}"
    )


def test_every_config_field_is_in_the_design_table_with_its_default():
    defaults = GPTBConfig().to_dict()
    own = {key: value for key, value in defaults.items() if key not in PretrainedConfig().to_dict()}
    design = DESIGN.read_text()
    assert "\n## Configuration\n" in design, "docs/design.md has no '## Configuration' section with the config table"
    section = design.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, flags=re.M))
    missing = sorted(set(own) - set(rows))
    stale = sorted(set(rows) - set(own))
    assert not missing, f"GPTBConfig fields missing from the table in docs/design.md#configuration: {missing}"
    assert not stale, f"rows of docs/design.md#configuration that are not GPTBConfig fields: {stale}"
    wrong = {key: (rows[key], own[key]) for key in own if ast.literal_eval(rows[key]) != own[key]}
    assert not wrong, f"defaults in docs/design.md#configuration differ from GPTBConfig's (table, code): {wrong}"


@pytest.mark.parametrize(
    "markdown", sorted(str(p.relative_to(ROOT)) for p in repository_files() if p.suffix == ".md"), ids=str
)
def test_relative_links_resolve_to_files_and_headings_in_the_repository(markdown):
    source = ROOT / markdown
    broken = []
    for target in markdown_links(source.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not a file of ours
            continue
        name, _, anchor = target.partition("#")
        linked = (source.parent / name).resolve() if name else source
        if not linked.exists() or ROOT not in (linked, *linked.parents):
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target} (no heading with that anchor in {linked.relative_to(ROOT)})")
    assert not broken, f"{markdown} has broken links: {broken}"


def test_the_readme_links_to_the_design_document():
    assert "docs/design.md" in markdown_links((ROOT / "README.md").read_text())


def test_references_to_design_sections_name_existing_headings():
    anchors = heading_anchors(DESIGN.read_text())
    wrong = []
    for path in repository_files():
        text = text_of(path)
        if text is not None:
            wrong += [
                f"{path.relative_to(ROOT)}: #{a}" for a in re.findall(r"design\.md#([\w-]+)", text) if a not in anchors
            ]
    assert not wrong, f"references to sections docs/design.md does not have: {wrong}"


def test_the_design_document_covers_each_subject():
    anchors = heading_anchors(DESIGN.read_text())
    subjects = {
        "the-step",
        "the-state-and-the-initial-state",
        "padding",
        "chunking-and-the-generation-cache",
        "training",
        "configuration",
        "artmemory",
        "the-batched-engine-and-what-exact-means",
        "art-inside-gptb",
        "file-formats",
        "distributed-art",
        "how-speed-is-measured",
        "state-update-variants",
        "segment-steps",
        "reliability-guarantees",
    }
    assert subjects <= anchors, f"docs/design.md lacks the sections {sorted(subjects - anchors)}"


def test_the_model_card_links_the_design_document_without_a_link_that_breaks_on_the_hub():
    # On the Hub a relative link resolves inside the model repo, which holds no docs/: the card links the source.
    text = render_model_card(GPTBConfig(n_embd=64, n_layer=2, n_head=4, state_size=4), base_model="gpt2").text
    assert f"[`docs/design.md`]({design_url()}) in the GPTB source repository" in " ".join(text.split())
    relative = [target for target in markdown_links(text) if not target.startswith("https://")]
    assert not relative, f"the model card has links that break on the Hub: {relative}"


@pytest.mark.parametrize(
    "module", ["modeling_gptb.modeling_gptb", "modeling_gptb.configuration_gptb", "modeling_gptb.art_memory"]
)
def test_the_remote_code_files_point_to_the_design_document(module):
    imported = __import__(module, fromlist=["_"])
    classes = [obj for obj in vars(imported).values() if isinstance(obj, type) and obj.__module__ == module]
    documented = imported.__doc__ + "".join(cls.__doc__ or "" for cls in classes)
    assert "docs/design.md#" in documented


# ---------------------------------------------------------------------------------------------------------------------
# Issue 20 item 5: the README is a user's page; the long tables live in docs/, everything inside the repository


def user_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_links_the_results_speed_and_gpu_pages():
    links = set(markdown_links((ROOT / "README.md").read_text()))
    assert {"docs/results.md", "docs/speed.md", "docs/gpu.md"} <= links


def test_the_user_pages_speak_without_issue_numbers_or_the_seeds_update():
    # "the seed's update" reads as random seeds: the pages say "the original step" / `replace`.
    wrong = []
    for page in user_pages():
        text = page.read_text()
        wrong += [f"{page.name}: {m.group(0)!r}" for m in re.finditer(r"\bissue \d+|\bseed's (?:update|step)", text)]
    assert not wrong, wrong


def test_nothing_points_outside_the_repository_for_the_gpu_recipe():
    shared = "../" + "shared/"  # spelled so that this file does not match
    outside = []
    for path in repository_files():
        text = text_of(path)
        if text is not None and path.suffix in (".md", ".sh", ".py") and shared in text:
            outside.append(str(path.relative_to(ROOT)))
    assert not outside, f"files that point at {shared}, which a clone does not have: {outside}"
    assert (ROOT / "modeling_gptb" / "benchmarks" / "fetch_wheels.sh").is_file()
