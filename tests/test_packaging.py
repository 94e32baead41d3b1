"""The distribution: both import roots ship in the wheel, and the operator side needs no torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    had_build_dir = (ROOT / "build").exists()
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
            check=True,
        )
    finally:
        if not had_build_dir:  # setuptools stages the wheel in ./build; leave the checkout as it was
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    return next(out.glob("kvfleet-*.whl"))


def test_wheel_maps_folders_to_import_roots(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "kvfleet/__init__.py",
        "kvfleet/cli.py",
        "kvfleet/operator/__init__.py",
        "kvfleet/operator/api/__init__.py",
        "kvfleet/operator/api/crdgen.py",
        "kvfleet/dataplane/__init__.py",
        "kvfleet/dataplane/model/attention.py",
        "kvfleet/dataplane/engine/api.py",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    assert not any(n.startswith(("operator/", "dataplane/", "tests/")) for n in names)
    # every package folder in the source tree made it into the wheel
    for root in ("operator", "dataplane"):
        for init in (ROOT / root).rglob("__init__.py"):
            rel = init.relative_to(ROOT / root).as_posix()
            assert f"kvfleet/{root}/{rel}" in names, f"{root}/{rel} not packaged"


def test_installed_wheel_imports_without_torch(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    code = BLOCK_TORCH + (
        f"sys.path.insert(0, {str(target)!r})\n"
        "import kvfleet.operator.api, kvfleet.dataplane, kvfleet.dataplane.engine.api, kvfleet.cli\n"
        "assert kvfleet.operator.api.__file__.startswith(sys.path[0]), kvfleet.operator.api.__file__\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_dataplane_model_imports_with_the_engine_extra():
    code = "import torch, kvfleet.dataplane.model.attention as a; print(a.DenseAttention.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "DenseAttention" in result.stdout, result.stderr


def test_cli_lists_commands_without_importing_torch():
    code = BLOCK_TORCH + "from kvfleet.cli import main; raise SystemExit(main(['--help']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in ("operator", "serve", "model", "eval-cache"):
        assert command in result.stdout
