"""Imports flow one way: stream -> operators -> frontend_bridge, with the CLI as composition root.

Each check runs in a fresh interpreter so that modules imported by other tests cannot hide a leak.
"""

import subprocess
import sys

import pytest

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


def test_operators_never_import_the_bridge() -> None:
    statement = "import operators.pipeline, operators.bundle, operators.clustering"
    assert "frontend_bridge" not in _roots(_modules_after_import(statement))


def test_serving_path_does_not_need_torch() -> None:
    statement = (
        "from pathlib import Path\n"
        "import operators\n"
        "from operators.bundle import ModelBundle\n"
        "ModelBundle.load(Path(operators.__file__).parent / 'bundles' / 'default')"
    )
    assert "torch" not in _roots(_modules_after_import(statement))
