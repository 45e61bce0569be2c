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


def test_the_e2b_front_end_acts_only_through_the_service() -> None:
    """compat/ may import the store's record types, but reads and writes sandboxes only through the
    service's verbs (its lock, state machine and audit log), never the store or the node directly."""
    import re

    reaching = re.compile(r"\b(?:cove|service|svc)\.(?:store|node)\b")
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "src" / "cove" / "compat").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if reaching.search(line) and not line.lstrip().startswith(("from ", "import "))
    ]
    assert not found, "\n".join(found)
