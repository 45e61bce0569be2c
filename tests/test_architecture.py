"""The architecture's import contracts (pyproject.toml [tool.importlinter], docs/architecture.md):
no cycles, the control plane never imports a front end, the node never imports the control plane."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 6, "the import contracts went missing from pyproject.toml"
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert f"{len(contracts)} kept, 0 broken" in report, report
