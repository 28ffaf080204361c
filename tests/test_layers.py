"""The package layers (imports point down only): `lint-imports` keeps the contracts in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.api import read_configuration

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # the venv's console script (the `test` extra)


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    """`lint-imports` run on this checkout, without its cache (nothing is written)."""
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} is missing: pip install -e '.[test]' (import-linter)")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_every_import_linter_contract_is_kept() -> None:
    contracts = read_configuration(str(ROOT / "pyproject.toml"))["contracts_options"]
    assert {contract["type"] for contract in contracts} >= {"layers", "forbidden"}
    result = lint_imports()
    output = " ".join((result.stdout + result.stderr).split())  # its report wraps long contract names
    assert result.returncode == 0, output
    for contract in contracts:
        assert f"{contract['name']} KEPT" in output, f"{contract['name']!r} was not checked: {output}"
    assert f"Contracts: {len(contracts)} kept, 0 broken." in output


def test_a_broken_layer_contract_fails(tmp_path: Path) -> None:
    """The linter sees this checkout's imports: upside-down layers break."""
    config = tmp_path / "upside_down.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["stage1_dvae", "pipelines"]\n\n'
        '[[tool.importlinter.contracts]]\nname = "upside down"\ntype = "layers"\n'
        'layers = ["stage1_dvae", "pipelines"]\n'
    )
    result = lint_imports(str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "stage1_dvae is not allowed to import pipelines" not in output
    assert "pipelines is not allowed to import stage1_dvae" in output
