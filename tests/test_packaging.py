"""What `pip install` puts on the path: the package and its namespaced tooling, no generic top-level names."""

import subprocess
import sys


def test_tooling_is_installed_under_the_package_namespace(tmp_path):
    probe = (
        "import importlib.util as u; "
        "print([n for n in ('benchmarks', 'experiments') if u.find_spec(n)]); "
        "print([n for n in ('modeling_gptb.benchmarks', 'modeling_gptb.experiments') if u.find_spec(n)])"
    )
    # Run outside the checkout, so only what the install put on the path is found.
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    generic, namespaced = out.stdout.splitlines()
    assert generic == "[]", f"pip installed generic top-level packages: {generic}"
    assert namespaced == "['modeling_gptb.benchmarks', 'modeling_gptb.experiments']"


def test_peft_is_an_extra():
    """`pip install gptb[peft]` brings peft (the PEFT tests skip only without it)."""
    from importlib.metadata import metadata

    info = metadata("gptb")
    assert "peft" in info.get_all("Provides-Extra")
    assert any(req.startswith("peft>=") and 'extra == "peft"' in req for req in info.get_all("Requires-Dist"))
