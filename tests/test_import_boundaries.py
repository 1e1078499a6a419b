"""Imports flow one way, as docs/internals.md draws them ("Import direction"), checked over every module.

The layer table is read from docs/internals.md itself, so the drawing and this test cannot drift apart. Every
import of every module of stream/, operators/ and frontend_bridge/ is parsed (top-level, lazy and
TYPE_CHECKING imports alike) and must be allowed by the table. The heavy-import checks run in a fresh
interpreter so that modules imported by other tests cannot hide a leak.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stream", "operators", "frontend_bridge")

HEAVY = ("torch", "onnxruntime", "umap", "numba", "pynndescent")


def _modules_after_import(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(done.stdout.split())


def _roots(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


@pytest.mark.parametrize("statement", ["import frontend_bridge.app", "import frontend_bridge.hub"])
def test_client_side_never_pulls_in_model_runtimes(statement: str) -> None:
    assert not _roots(_modules_after_import(statement)) & set(HEAVY)


def test_cli_help_does_not_import_torch() -> None:
    assert "torch" not in _roots(_modules_after_import("import stream.cli"))


def _layer_table() -> tuple[dict[str, str], dict[str, set[str] | None]]:
    """(module prefix -> layer, layer -> layers it may import; None: any) from docs/internals.md."""
    text = (REPO / "docs" / "internals.md").read_text()
    block = re.search(r"<!-- import-layers:.*?-->\s*```\n(.*?)```", text, re.DOTALL)
    assert block, "docs/internals.md lost its import-layers table"
    layer_of: dict[str, str] = {}
    allowed: dict[str, set[str] | None] = {}
    for line in block.group(1).splitlines()[1:]:  # the first line names the columns
        layer, modules, may = (column.split() for column in line.split("|"))
        [layer] = layer
        layer_of.update(dict.fromkeys(modules, layer))
        allowed[layer] = None if may == ["*"] else {layer} | ({*may} - {"-"})
    return layer_of, allowed


def _layer(module: str, layer_of: dict[str, str]) -> str:
    matches = [p for p in layer_of if module == p or module.startswith(p + ".")]
    assert matches, f"{module} is in no layer of docs/internals.md"
    return layer_of[max(matches, key=len)]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every project module `path` imports (`from pkg import submodule` counts as the submodule)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                as_module = REPO.joinpath(*sub.split("."))
                found.add(sub if as_module.with_suffix(".py").exists() or as_module.is_dir() else target)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _all_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_every_import_of_every_module_follows_the_drawing_in_internals() -> None:
    layer_of, allowed = _layer_table()
    modules = _all_modules()
    assert len(modules) > 50  # the walk found the packages
    wrong = []
    for path in modules:
        layer = _layer(_module_name(path), layer_of)
        ok = allowed[layer]
        for target in sorted(_imports(path)):
            if ok is not None and _layer(target, layer_of) not in ok:
                wrong.append(f"{_module_name(path)} ({layer}) imports {target} ({_layer(target, layer_of)})")
    assert not wrong, "imports the drawing in docs/internals.md does not allow:\n" + "\n".join(wrong)


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    # the check itself can fail: operators importing the bridge, the bridge importing model code
    layer_of, allowed = _layer_table()
    assert _layer("frontend_bridge.app", layer_of) not in allowed[_layer("operators.pipeline", layer_of)]
    assert _layer("operators.bundle", layer_of) not in allowed[_layer("frontend_bridge.hub", layer_of)]
    assert _layer("stream.serve", layer_of) not in allowed[_layer("stream.ingest", layer_of)]
    assert _layer("operators.base", layer_of) not in allowed[_layer("stream.protocol", layer_of)]
    assert _imports(REPO / "frontend_bridge" / "hub.py") >= {"operators.point_row", "operators.messages"}
    # stream's bottom may use the contracts (the Tiled URI parser), nothing else of operators
    assert _layer("operators.tiled_layout", layer_of) in allowed[_layer("stream.readers.tiled", layer_of)]
    assert _layer("operators.persist.catalog", layer_of) not in allowed[_layer("stream.readers.tiled", layer_of)]
    assert "operators.tiled_layout" in _imports(REPO / "stream" / "readers" / "tiled.py")


def test_serving_path_does_not_need_torch() -> None:
    statement = (
        "from pathlib import Path\n"
        "import operators\n"
        "from operators.bundle import ModelBundle\n"
        "ModelBundle.load(Path(operators.__file__).parent / 'bundles' / 'default')"
    )
    assert "torch" not in _roots(_modules_after_import(statement))
