"""The library's layers import downwards only: model <- images <- answers <- web.

The model side (store, encoders, runner, batching, device decode) must never import the HTTP
side, and each layer only what lies below it, so that the runner process loads no HTTP code and
each layer is testable on its own. The shared modules at the top of `clip_runner/` (config,
cuda_check, cpu_quota, metrics, errors, bound_apis, gc_tuning, gil_handover, malloc_tuning) may be
imported by any layer. Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, python_output

PACKAGE = REPO_ROOT / "clip_runner"
LAYERS = ("model", "images", "answers", "web")
SHARED = {
    "config",
    "cuda_check",
    "cpu_quota",
    "metrics",
    "errors",
    "bound_apis",
    "gc_tuning",
    "gil_handover",
    "host_lookup",
    "malloc_tuning",
    "open_files",
}


def project_imports(path: Path) -> set[str]:
    """Every `clip_runner...` module a file imports, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
            found.add(node.module)
    return {name for name in found if name.split(".")[0] == "clip_runner"}


def layer_of(dotted: str) -> str | None:
    """The layer a `clip_runner...` name belongs to; None for the shared top-level modules."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def library_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_lives_in_a_layer_or_is_shared():
    for path in library_files():
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 1:
            assert relative.stem in SHARED | {"__init__"}, f"{relative}: not a shared module"
        else:
            assert relative.parts[0] in LAYERS, f"{relative}: not in a layer"


def test_the_readmes_layout_names_every_module_in_its_folder():
    """README's Layout is where a reader finds a module's one job: nine had been left out."""
    readme = (REPO_ROOT / "README.md").read_text()
    layout = readme.split("\n## Layout\n", 1)[1].split("\n```\n", 2)[1]
    listed, folder = set(), ""
    for line in layout.splitlines():
        indent, words = len(line) - len(line.lstrip()), line.split()
        if not words or indent > 4:  # a description carried on to the next line
            continue
        if words[0].endswith("/"):
            folder = words[0] if indent == 2 else ""
        for word in words:  # `ui.py, ui.html`: names until one without a comma
            if word.rstrip(",").endswith((".py", ".html")):
                listed.add(folder + word.rstrip(","))
            if not word.endswith(","):
                break
    modules = {
        path.relative_to(PACKAGE).as_posix()
        for path in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.html")]
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }
    assert "model/store.py" in listed and "config.py" in listed
    assert not modules - listed, f"modules README's Layout does not name: {modules - listed}"


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_itself_the_layers_below_and_the_shared_modules(layer: str):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    offending = {
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in (PACKAGE / layer).rglob("*.py")
        for name in project_imports(path)
        if (target := layer_of(name)) is not None and target not in allowed
    }
    assert not offending


def test_shared_modules_import_no_layer_above_the_model_side():
    offending = {
        f"{path.name} imports {name}"
        for path in PACKAGE.glob("*.py")
        for name in project_imports(path)
        if layer_of(name) not in (None, "model")
    }
    assert not offending


def test_the_check_sees_a_violation(tmp_path: Path):
    """The import scan finds imports at the top and inside functions."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from clip_runner.model import batching\ndef f():\n    import clip_runner.web.schemas\n"
    )
    names = project_imports(sample)
    assert {layer_of(name) for name in names} == {"model", "web"}


def test_importing_the_service_loads_neither_torch_transformers_nor_numba(bentoml_home):
    """`import service` is what the supervisor and every worker run first: it must not load
    the model's libraries, which only the runner's worker needs (model/engine.py), nor numba,
    which only the API workers' resize needs (images/loading.compiled_resizer)."""
    code = (
        "import sys, service\n"
        "print(sorted({'torch', 'transformers', 'numba'} & set(sys.modules)))\n"
    )
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    said = python_output(code, env=env, timeout=120)
    assert said.strip().splitlines()[-1] == "[]"
